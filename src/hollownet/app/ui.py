"""The Gradio page: four steps, wired to the plain functions in handlers.py.

The page holds no state of its own: a timer asks the server's job registry (``handlers.view``) once a
second what to show, so a reloaded page re-attaches to a running job, and to the newest run on disk
after a restart of the app.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: nothing leaves the machine

import gradio as gr  # noqa: E402  (after the environment it reads at import)
import pandas as pd  # noqa: E402  (gradio's own dependency: LinePlot takes a DataFrame)

from hollownet.app import handlers as h  # noqa: E402
from hollownet.app.jobs import Jobs  # noqa: E402
from hollownet.devices import resolve_device  # noqa: E402
from hollownet.settings import PRECISIONS  # noqa: E402
from hollownet.toy import NAME as TOY  # noqa: E402

# system fonts only: the default theme fetches Google Fonts, which an offline machine cannot reach
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
SETTINGS = ("model", "prompt", "method", "precision", "steps", "rank", "resolution", "lr", "batch", "seed", "device",
            "sample_every", "save_every")
CSS = "#progress progress {width: 100%; height: 18px}"


def progress_html(step: int, total: int, running: bool) -> str:
    pct = 100 * step / total if total else 0
    label = f"step {step} / {total}" if total else "no training yet"
    return (f'<div id="progress"><progress value="{step}" max="{max(total, 1)}"></progress>'
            f'<span>{label} ({pct:.0f}%){" — running" if running else ""}</span></div>')


def loss_frame(losses: list) -> pd.DataFrame:
    return pd.DataFrame({"step": list(range(1, len(losses) + 1)), "loss": [float(x) for x in losses]})


def build(workdir: str | Path, device: str | None = None) -> gr.Blocks:  # wide: one gr.Blocks tree, its nesting the page
    jobs = Jobs(workdir)
    uploads = Path(workdir) / "uploads"
    device = resolve_device(device)  # checked before the page is built
    d = h.defaults_for(TOY)

    def settings_of(values) -> dict:
        return dict(zip(SETTINGS, values))

    with gr.Blocks(title="hollownet") as demo:
        gr.Markdown("# hollownet: personalize Stable Diffusion on your photos\nEverything runs on this machine; "
                    "the photos never leave it.")
        message = gr.Textbox(label="message", elem_id="message", interactive=False, lines=2)
        with gr.Group(elem_id="step1"):
            gr.Markdown("## 1. Model, photos, prompt")
            with gr.Row():
                model = gr.Textbox(value=TOY, label="model", info="'toy' (the bundled toy model), a diffusers model "
                                   "folder, or one .safetensors / .ckpt file", elem_id="model")
                prompt = gr.Textbox(value="a sks shape", label="prompt", info='with a rare word, e.g. "a photo of sks dog"',
                                    elem_id="prompt")
            photos = gr.File(file_count="multiple", file_types=["image"], label="drop 3-6 photos of the subject",
                             height=150, elem_id="photos")
            preview = gr.Gallery(label="photos", columns=8, fit_columns=False, object_fit="contain", height=150,
                                 elem_id="preview")
            notes = gr.Markdown(elem_id="notes")
        with gr.Group(elem_id="step2"):
            gr.Markdown("## 2. Settings and the memory plan (before anything loads)")
            with gr.Row():
                method = gr.Dropdown(["hollow", "lora", "full"], value="hollow", label="method")
                precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="precision")
                steps = gr.Number(value=d["steps"], label="steps", precision=0, elem_id="steps")
                rank = gr.Number(value=d["rank"], label="rank", precision=0)
                resolution = gr.Number(value=d["resolution"], label="resolution", precision=0, elem_id="resolution")
                lr = gr.Number(value=d["lr"], label="learning rate")
                batch = gr.Number(value=d["batch"], label="batch", precision=0, elem_id="batch")
                seed = gr.Number(value=0, label="seed", precision=0)
                dev = gr.Textbox(value=device, label="device")
            plan_btn = gr.Button("Plan memory", elem_id="plan")
            plan = gr.Markdown(elem_id="plan-table")
            with gr.Row():
                budget = gr.Textbox(label="memory budget", placeholder="e.g. 2GB", elem_id="budget")
                suggest_btn = gr.Button("Suggest settings that fit", elem_id="suggest")
                use_best = gr.Button("Use the best", elem_id="use-best")
            suggestion = gr.Markdown(elem_id="suggestion")
            best = gr.State((None, None))
        with gr.Group(elem_id="step3"):
            gr.Markdown("## 3. Train")
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="train")
                stop_btn = gr.Button("Stop", elem_id="stop")
                resume_btn = gr.Button("Resume", elem_id="resume")
                sample_every = gr.Number(value=100, label="sample images every N steps (0: none)", precision=0,
                                         elem_id="sample-every")
                save_every = gr.Number(value=100, label="LoRA snapshot every N steps (0: none)", precision=0,
                                       elem_id="save-every")
            status = gr.Textbox(label="status", elem_id="status", interactive=False)
            progress = gr.HTML(progress_html(0, 0, False))
            loss = gr.LinePlot(loss_frame([]), x="step", y="loss", label="loss", height=220, elem_id="loss")
            memory = gr.Markdown(elem_id="memory")
            sheet = gr.Image(label="samples: a row per step, a column per prompt", type="filepath", interactive=False,
                             elem_id="sample-sheet")
        with gr.Group(elem_id="step4"):
            gr.Markdown("## 4. Generate and download")
            with gr.Row():
                gen_prompt = gr.Textbox(value="a sks shape on a black background", label="prompt", scale=3, elem_id="gen-prompt")
                gen_seed = gr.Number(value=0, label="seed", precision=0)
                gen_steps = gr.Number(value=d["gen_steps"], label="steps", precision=0, elem_id="gen-steps")
                guidance = gr.Number(value=d["guidance"], label="guidance")
                num_images = gr.Number(value=2, label="images", precision=0)
                path = gr.Radio(["two-path", "merged"], value="two-path", label="inference")
                lora_choice = gr.Dropdown([h.FINAL], value=h.FINAL, label="LoRA", elem_id="lora-choice",
                                          info="the final one, or a snapshot made while training")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="generated", columns=6, fit_columns=False, object_fit="contain", height=200,
                                 elem_id="gallery")
            with gr.Row():
                lora_files = gr.File(label="LoRA (diffusers and kohya files)", file_count="multiple", interactive=False,
                                     elem_id="lora-files")
                images_file = gr.File(label="images (zip)", interactive=False, elem_id="images-zip")

        inputs = [model, prompt, method, precision, steps, rank, resolution, lr, batch, seed, dev, sample_every, save_every]
        page = [status, progress, loss, memory, gallery, lora_files, images_file, sheet, lora_choice]

        def on_model(name):
            dd = h.defaults_for(name)
            return dd["steps"], dd["rank"], dd["resolution"], dd["lr"], dd["batch"], dd["gen_steps"], dd["guidance"]

        model.blur(on_model, model, [steps, rank, resolution, lr, batch, gen_steps, guidance])

        def on_photos(files, res):
            good, lines = h.check_photos(list(files or []), int(res or 64), uploads)
            return good, "\n\n".join(lines) or (f"{len(good)} photos ready" if good else "")

        photos.change(on_photos, [photos, resolution], [preview, notes])
        n_photos = lambda files: len(files or [])  # noqa: E731
        plan_btn.click(lambda files, *v: h.plan_table(settings_of(v), n_photos(files)), [photos, *inputs], plan)

        def on_suggest(files, text, *v):
            table, prec, meth = h.suggest(settings_of(v), n_photos(files), text)
            return table, (prec, meth)

        suggest_btn.click(on_suggest, [photos, budget, *inputs], [suggestion, best])
        use_best.click(lambda b: (b[0] or gr.skip(), b[1] or gr.skip()), best, [precision, method])

        train_btn.click(lambda files, *v: h.start_training(jobs, list(files or []), settings_of(v)), [photos, *inputs], message)
        stop_btn.click(lambda: h.stop(jobs), None, message)
        resume_btn.click(lambda: h.resume_training(jobs), None, message)
        gen_btn.click(lambda *g: h.start_generation(jobs, dict(zip(("prompt", "seed", "steps", "guidance", "num_images",
                                                                       "path", "lora"), g))),
                      [gen_prompt, gen_seed, gen_steps, guidance, num_images, path, lora_choice], message)

        shown = gr.State({})

        def refresh(last: dict):
            v = h.view(jobs)
            new = {"status": v["status"] + ("\n" + "\n".join(v["notes"]) if v["notes"] else ""),
                   "progress": progress_html(v["step"], v["total"], v["running"]), "loss": tuple(v["losses"]),
                   "memory": v["memory"], "gallery": tuple(v["gallery"]), "lora": tuple(v["lora_files"]),
                   "zip": v["images_zip"], "sheet": v["sheet"], "snapshots": tuple(v["snapshots"])}
            make = {"loss": lambda x: loss_frame(list(x)), "gallery": list, "lora": lambda x: list(x) or None,
                    "sheet": lambda x: x[0] if x else None,  # (path, mtime): a new row redraws it
                    "snapshots": lambda x: gr.update(choices=list(x))}
            out = [gr.skip() if last.get(k) == val else make.get(k, lambda x: x)(val) for k, val in new.items()]
            return [*out, new]

        gr.Timer(1.0).tick(refresh, shown, [*page, shown], show_progress="hidden")

        def reattach():
            """A reloaded page: the newest run's settings and photos, as the server knows them."""
            last = jobs.latest.get("train")
            if last is None:
                return [gr.skip()] * (len(inputs) + 1)
            s = last.settings
            return [*(s.get(k, gr.skip()) for k in SETTINGS), h.view(jobs)["photos"]]

        demo.load(reattach, None, [*inputs, preview])
    demo.jobs = jobs  # the tests and the launcher reach the registry through the page
    return demo


def launch(workdir: str | Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           device: str | None = None, block: bool = True, auth: tuple[str, str] | None = None):
    demo = build(workdir, device)
    demo.queue(default_concurrency_limit=4)
    # quiet: Gradio's start-up lines tell a CLI user to "set `share=True` in `launch()`"; hollownet app prints its own
    demo.launch(server_name=host, server_port=port, share=share, inbrowser=False, prevent_thread_lock=True,
                allowed_paths=[str(Path(workdir).resolve())], theme=THEME, css=CSS, ssr_mode=False, quiet=True,
                footer_links=[], auth=auth)
    if block:
        demo.block_thread()
    return demo
