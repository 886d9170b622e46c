"""The documentation of every ``data:`` key and every ``data.type``: the README's "Data" section is rendered from
here (``python -m tur_ext.data.keys``), and a test fails when a key the builders accept is not described."""
from __future__ import annotations

from typing import Dict, NamedTuple

__all__ = ["DataKey", "DATA_KEYS", "DATA_TYPES", "markdown"]


class DataKey(NamedTuple):
    type: str
    default: str
    meaning: str


#: Every key of a run config's ``data:`` section, in the order the README lists them.
DATA_KEYS: Dict[str, DataKey] = {
    "type": DataKey("str", "embedded", "the source: one of the types below"),
    "root": DataKey("path", "-", "the folder of a folder type; the splits are looked for under it"),
    "train_root": DataKey("path", "ROOT/<train split>", "the training split's folder, when it is elsewhere"),
    "eval_root": DataKey("path", "ROOT/<eval split>", "the evaluation split's folder, when it is elsewhere"),
    "task": DataKey("str", "-", "`paired`: the task of its pairs (the fixed-task types know theirs)"),
    "lq_dir": DataKey("str", "lq", "`paired`: the folder name of the degraded images"),
    "gt_dir": DataKey("str", "gt", "`paired`: the folder name of the ground truth (same file names or stems)"),
    "datasets": DataKey("list", "-", "`combined`: the sources, each a mapping with its own `type`; they inherit "
                                     "seed, patch_size, augment, skip_bad_images, length, eval_crop, "
                                     "eval_crops_per_task, size_multiple, max_eval_images"),
    "seed": DataKey("int", "the run's seed", "seeds crops, augmentation, degradations and the eval set"),
    "patch_size": DataKey("int", "128", "training crop (smaller images are reflect-padded)"),
    "augment": DataKey("bool", "true", "random flips and 90-degree rotations of training patches"),
    "skip_bad_images": DataKey("bool", "false", "false: an unreadable image is an error naming it (eval splits "
                                                "are decoded and training splits' headers read before the first "
                                                "step); true: every image is decoded once when the dataset is built and the bad ones "
                                                "are dropped, named in a warning and counted in the log"),
    "length": DataKey("int", "1000", "`embedded`: training items per epoch"),
    "eval_crop": DataKey("int or null", "128 (embedded), null", "eval crop size (folder types: a centre crop, "
                                                                "so that batches stack; null: whole images)"),
    "eval_crops_per_task": DataKey("int", "4", "`embedded`: eval crops per task"),
    "train_images": DataKey("list", "TRAIN_IMAGES", "`embedded`: scikit-image image names for training"),
    "eval_images": DataKey("list", "EVAL_IMAGES", "`embedded`: scikit-image image names for evaluation (disjoint)"),
    "size_multiple": DataKey("int", "16", "folder eval: whole images are cropped (bottom/right) to a multiple"),
    "max_eval_images": DataKey("int or null", "null", "folder eval: at most this many images per task"),
    "list_file": DataKey("str", "allweather.txt", "`allweather` training: the list file's name"),
    "test_lists": DataKey("mapping", "{snow: snowtest100k_L.txt, rain_fog: test1.txt, raindrop: raindroptesta.txt}",
                          "`allweather` eval: the list file of each task"),
    "task_patterns": DataKey("list or null", "null", "`allweather` training: `[[task, regex], ...]`, a listed "
                                                     "path's task is the first that matches"),
    "list_dir": DataKey("path or null", "null", "`real_weather` training: where TUR's list files are"),
    "batch_size": DataKey("int", "8", "training batch, in total over all processes (trainer)"),
    "eval_batch_size": DataKey("int", "1", "evaluation batch (trainer); whole images of different sizes need 1"),
    "num_workers": DataKey("int", "0", "DataLoader worker processes (trainer)"),
    "pin_memory": DataKey("bool", "on CUDA", "DataLoader pin_memory (trainer)"),
    "persistent_workers": DataKey("bool", "false", "DataLoader persistent_workers (trainer)"),
    "prefetch_factor": DataKey("int", "torch's", "DataLoader prefetch_factor (trainer)"),
    "num_batches": DataKey("int or null", "null", "batches per epoch instead of the dataset's length (trainer)"),
    "batches_per_epoch": DataKey("int or null", "null", "the same as num_batches"),
    "train": DataKey("mapping", "-", "keys that apply to the training set only (a `type` here replaces the "
                                     "top-level source keys)"),
    "eval": DataKey("mapping", "-", "keys that apply to the evaluation set only"),
}

#: Every ``data.type``: its tasks and its folder layout under ``root``.
DATA_TYPES: Dict[str, str] = {
    "embedded": "the images scikit-image ships, degraded on the fly for every task of the run (no folders)",
    "promptir3": "PromptIR/AirNet 3-task tree: `Train/Denoise/**/*.png` (clean; noise added on the fly), "
                 "`Train/Derain/{rainy,gt}/`, `Train/Dehaze/{synthetic,original}/`; `test/denoise/bsd68/`, "
                 "`test/derain/Rain100L/{input,target}/`, `test/dehaze/{input,target}/`",
    "gopro": "deblur: `train/<sequence>/{blur,sharp}/` and `test/...` (or TUR/Restormer's `input/` + `target/`)",
    "lol": "lowlight: `our485/{low,high}/` and `eval15/{low,high}/` (or `train|test`, `gt/`, `normal/`)",
    "paired": "one task (`data.task`): `train/{lq,gt}/` and `test/{lq,gt}/` (or `val/`); folder names from "
              "`lq_dir`/`gt_dir`",
    "clean": "clean images only, every task synthesised: `train/` and `test/` (or `val/`)",
    "snow100k": "snow: `all/{synthetic,gt}/` and `test/Snow100K-L/{synthetic,gt}/`",
    "outdoor_rain": "rain_fog: `train/{in,gt}/` and `test1/{in,gt}/` (`im_0001_s80_a04.png` -> `im_0001.png`)",
    "raindrop": "raindrop: `train/{data,gt}/` and `test_a/{data,gt}/` (`0_rain.png` -> `0_clean.png`)",
    "allweather": "snow, rain_fog, raindrop: TransWeather's `train/allweather.txt` + `train/allweather/{input,gt}/`, "
                  "`test/{test1,raindroptesta,snowtest100k_L}.txt` + `test/<set>/{input,gt}/`",
    "real_weather": "real_rain, real_snow, real_fog: TUR's lists under `train/`, WGWS-Net's test folders under "
                    "`test/` (SPA+, RealSnow, REVIDE)",
    "mio": "blur, noise, jpeg, rain, haze, dark, sr: MiOIR's `DF2K/` training pairs and `CL_test/` (or `MiO_test/`)",
    "combined": "several sources at once (`datasets:`), e.g. promptir3 + gopro + lol for the 5-task setting",
}

_BEGIN = "<!-- data-keys: generated by python -m tur_ext.data.keys; edit tur_ext/data/keys.py -->"
_END = "<!-- data-keys: end -->"


def markdown() -> str:
    """The README's generated part of its "Data" section (between its two markers, markers included)."""
    lines = [_BEGIN, "", "| `data.` key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {v.type} | {v.default} | {v.meaning} |" for k, v in DATA_KEYS.items()]
    lines += ["", "| `data.type` | tasks and layout under `root` |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in DATA_TYPES.items()]
    lines += ["", _END]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
