"""hollownet: on-device personalization of Stable Diffusion with Hollowed Net.

The API mirrors the command line::

    from hollownet import TrainRequest, personalize, GenerateConfig, run_generate

Names are imported lazily, so ``import hollownet`` stays fast (torch and diffusers load on first use).
"""

__version__ = "0.1.0"

_API = {
    "TrainRequest": "requests",
    "PlanRequest": "requests",
    "Modes": "settings",
    "plan_memory": "memory.planner",
    "personalize": "workflow",
    "run_demo": "workflow",
    "GenerateConfig": "stages.generate",
    "run_generate": "stages.generate",
    "make_plan": "cut",
    "MemoryTracker": "memory.tracker",
    "evaluate_folder": "evaluation.metrics",
    "HollownetError": "errors",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module 'hollownet' has no attribute {name!r}")


__all__ = list(_API)
