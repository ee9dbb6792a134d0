"""A stand-in for ``../shared/data/dreambooth`` built from the bundled demo photos, so a fresh clone
runs every test: the DreamBooth layout (``prompts_and_classes.txt`` listing 30 subjects, 20 of
them present with 4-6 photos each, camera-style MPO photos with an EXIF orientation tag), with
prompts of its own and photos derived from the 4 bundled 128 px demo photos. Tests that check
facts of the real data (its exact prompts) do so in addition where the real data is present.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

SUBJECTS = {  # the benchmark's 30 subjects and classes; True: present here (as in the shared subset)
    "backpack": ("backpack", True), "backpack_dog": ("backpack", True), "bear_plushie": ("stuffed animal", False),
    "berry_bowl": ("bowl", True), "can": ("can", True), "candle": ("candle", True), "cat": ("cat", True),
    "cat2": ("cat", False), "clock": ("clock", False), "colorful_sneaker": ("sneaker", True), "dog": ("dog", True),
    "dog2": ("dog", True), "dog3": ("dog", False), "dog5": ("dog", True), "dog6": ("dog", True),
    "dog7": ("dog", False), "dog8": ("dog", True), "duck_toy": ("toy", True), "fancy_boot": ("boot", False),
    "grey_sloth_plushie": ("stuffed animal", True), "monster_toy": ("toy", True), "pink_sunglasses": ("glasses", True),
    "poop_emoji": ("toy", True), "rc_car": ("toy", False), "red_cartoon": ("cartoon", True), "robot_toy": ("toy", True),
    "shiny_sneaker": ("sneaker", False), "teapot": ("teapot", False), "vase": ("vase", True),
    "wolf_plushie": ("stuffed animal", False),
}
PLACES = ("in the jungle", "in the snow", "on the beach", "on a cobblestone street", "on top of pink fabric",
          "on top of a wooden floor", "with a city in the background", "with a mountain in the background",
          "with a blue house in the background", "on top of a purple rug in a forest", "floating in an ocean of milk",
          "on top of green grass with sunflowers around it", "on top of a mirror", "on top of the sidewalk in a crowded street",
          "on top of a dirt road", "with a wheat field in the background", "with a tree and autumn leaves in the background",
          "with the Eiffel Tower in the background", "floating on top of water")
OBJECT_EXTRA = ("a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}",
                "a {0} {1} on a stone")
LIVE_EXTRA = ("a {0} {1} wearing a red hat", "a {0} {1} in a chef outfit", "a {0} {1} in a purple wizard outfit",
              "a purple {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}")


def _prompt_list(extra) -> str:
    items = [f"'a {{0}} {{1}} {p}'.format(unique_token, class_token)" for p in PLACES] + \
            [f"'{p}'.format(unique_token, class_token)" for p in extra]
    assert len(items) == 25
    return "prompt_list = [\n" + ",\n".join(items) + "\n]\n"


def prompts_file() -> str:
    classes = "\n".join(f"{name},{noun}" for name, (noun, _) in SUBJECTS.items())
    return (f"Classes\n\nsubject_name,class\n{classes}\n\nPrompts\n\nObject Prompts\n\n{_prompt_list(OBJECT_EXTRA)}\n"
            f"Live Subject Prompts\n\n{_prompt_list(LIVE_EXTRA)}")


def make_dreambooth_standin(root: Path, demo: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(prompts_file())
    base = [Image.open(p).convert("RGB") for p in sorted(demo.glob("*.jpg"))]
    present = [n for n, (_, here) in SUBJECTS.items() if here]
    for k, name in enumerate(present):
        folder = root / name
        folder.mkdir(exist_ok=True)
        count = 4 + k % 3 if name != "dog" else 5
        for i in range(count):
            im = base[(i + k) % len(base)]
            if k % 2:
                im = ImageOps.mirror(im)
            im = im.rotate(90 * (k % 4)).resize((160 + 8 * i, 128))  # not square, different sizes
            if name == "candle" and i == 0:  # a camera photo: 2-frame MPO with an EXIF orientation tag
                exif = Image.Exif()
                exif[0x0112] = 6
                im.save(folder / f"{i:02d}.jpg", "MPO", save_all=True, append_images=[ImageOps.flip(im)],
                        exif=exif.tobytes(), quality=90)
            else:
                im.save(folder / f"{i:02d}.jpg", "JPEG", quality=90)
    return root
