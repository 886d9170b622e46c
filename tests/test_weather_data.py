"""Deweathering and MiOIR data on small trees written with OpenCV in the published layouts: TransWeather's AllWeather
lists (its own tree and WeatherDiffusion's), the Snow100K / Outdoor-Rain / RainDrop folders, the real-world set of
the TUR release (TUR's lists, WGWS-Net's test folders), MiOIR's precomputed 7-task pairs."""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from tur_ext.data import (ImageReadError, build_eval_dataset, build_eval_loader, build_train_dataset,
                          build_train_loader, read_image)
from tur_ext.data.weather import (find_file, outdoor_rain_gt_names, raindrop_gt_names, read_list_file,
                                  spa_gt_names)
from tur_ext.tasks import TaskSet

ALLWEATHER = TaskSet("allweather")
REAL = TaskSet("real_weather")
_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def _photo(i: int, h: int = 40, w: int = 56) -> np.ndarray:
    """A clean scikit-image photo (one of six, by ``i``), resized, as 8-bit BGR for cv2.imwrite."""
    rgb = getattr(skimage.data, _SOURCES[i % len(_SOURCES)])()
    small = cv2.resize(rgb[..., :3], (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(small[..., ::-1])


def _weathered(clean: np.ndarray, i: int) -> np.ndarray:
    """A visibly different degraded copy (veil plus streaks), so lq and gt never coincide."""
    out = clean.astype(np.float32) * 0.6 + 90.0
    out[:, (i % 5)::7] = 235.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _write(path: Path, img: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return str(path)


def _pair(lq: Path, gt: Path, i: int, h: int = 40, w: int = 56) -> None:
    clean = _photo(i, h, w)
    _write(gt, clean)
    _write(lq, _weathered(clean, i))


def _assert_window(item: dict, lq_path: str, gt_path: str) -> None:
    """The item's patch is the same window of the lq file and of the gt file."""
    lq_full, gt_full = read_image(lq_path), read_image(gt_path)
    g = item["gt"].permute(1, 2, 0).numpy()
    s = g.shape[0]
    hits = [(y, x) for y in range(gt_full.shape[0] - s + 1) for x in range(gt_full.shape[1] - s + 1)
            if np.array_equal(gt_full[y:y + s, x:x + s], g)]
    assert len(hits) == 1
    y, x = hits[0]
    np.testing.assert_array_equal(item["lq"].permute(1, 2, 0).numpy(), lq_full[y:y + s, x:x + s])


# ----------------------------------------------------------------------------- AllWeather (TransWeather)

# One file of each source, with the source's own naming (Outdoor-Rain, RainDrop, Snow100K).
ALLWEATHER_FILES = {"rain_fog": ["im_0001_s80_a04.png", "im_0002_s95_a06.png"], "raindrop": ["3_rain.png"],
                    "snow": ["beautiful_smile_00001.jpg", "city_read_00007.jpg"]}


def make_transweather_tree(data: Path, benchmark_gt_names: bool = False) -> Path:
    """TransWeather's ``data/``: train/allweather.txt + train/allweather/{input,gt}; test/<list>.txt + test/<set>/
    {input,gt}. With ``benchmark_gt_names`` the gt files carry the benchmarks' own names (im_0001.png,
    3_clean.png) instead of the input's."""
    lines, i = [], 0
    prefixes = ["./", "", "/"]  # the lists are joined by string concatenation: all three forms occur
    for task, names in ALLWEATHER_FILES.items():
        for name in names:
            gt_name = {"rain_fog": outdoor_rain_gt_names, "raindrop": raindrop_gt_names}.get(
                task, lambda n: [n])(name)[0] if benchmark_gt_names else name
            _pair(data / "train" / "allweather" / "input" / name, data / "train" / "allweather" / "gt" / gt_name, i)
            lines.append(f"{prefixes[i % 3]}allweather/input/{name}")
            i += 1
    (data / "train" / "allweather.txt").write_text("\n".join(lines) + "\n\n")
    tests = {"rain_fog": ("test1.txt", "Test1", ["im_0601_s90_a05.png", "im_0602_s85_a04.png"]),
             "raindrop": ("raindroptesta.txt", "raindrop_a", ["0_rain.png", "1_rain.png", "2_rain.png"]),
             "snow": ("snowtest100k_L.txt", "Snow100K-L", ["snow_test_0001.jpg"])}
    for task, (list_name, folder, names) in tests.items():
        for name in names:
            _pair(data / "test" / folder / "input" / name, data / "test" / folder / "gt" / name, i, h=48, w=64)
            i += 1
        (data / "test" / list_name).write_text("".join(f"./{folder}/input/{n}\n" for n in names))
    return data


def test_allweather_train_list_tasks_and_pairs(tmp_path):
    data = make_transweather_tree(tmp_path / "data")
    ds = build_train_dataset({"type": "allweather", "root": str(data), "patch_size": 24, "augment": False},
                             "allweather")
    assert len(ds) == 5 and ds.tasks_present == ["snow", "rain_fog", "raindrop"]
    by_name = {os.path.basename(lq): (task, gt) for task, lq, gt in ds.records}
    for task, names in ALLWEATHER_FILES.items():
        for name in names:
            assert by_name[name][0] == task
            assert by_name[name][1] == str(data / "train" / "allweather" / "gt" / name)  # input -> gt
    for i in range(len(ds)):
        item = ds[i]
        assert item["lq"].shape == (3, 24, 24) and item["task"] == ds.task_of(i)
        assert item["task_id"] == ALLWEATHER.id(item["task"])
        _assert_window(item, ds.records[i][1], ds.records[i][2])
    # A batch of the task-balanced loader holds every task.
    loader = build_train_loader(ds, 3, seed=0)
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))
    assert sorted(batch["task"]) == ["rain_fog", "raindrop", "snow"] and batch["lq"].shape == (3, 3, 24, 24)


def test_allweather_weatherdiffusion_layout_and_benchmark_gt_names(tmp_path):
    # WeatherDiffusion keeps the list inside data/allweather; here the gt files carry the benchmarks' names.
    make_transweather_tree(tmp_path / "tw", benchmark_gt_names=True)
    root = tmp_path / "data"
    (tmp_path / "tw" / "train").rename(root)
    ds = build_train_dataset({"type": "allweather", "root": str(root), "patch_size": 16}, "allweather")
    gts = {os.path.basename(lq): os.path.basename(gt) for _, lq, gt in ds.records}
    assert gts == {"im_0001_s80_a04.png": "im_0001.png", "im_0002_s95_a06.png": "im_0002.png",
                   "3_rain.png": "3_clean.png", "beautiful_smile_00001.jpg": "beautiful_smile_00001.jpg",
                   "city_read_00007.jpg": "city_read_00007.jpg"}


def test_allweather_test_lists(tmp_path):
    data = make_transweather_tree(tmp_path / "data")
    ds = build_eval_dataset({"type": "allweather", "root": str(data), "size_multiple": 16}, "allweather")
    counts = {t: [ds.task_of(i) for i in range(len(ds))].count(t) for t in ALLWEATHER}
    assert counts == {"snow": 1, "rain_fog": 2, "raindrop": 3}
    item = ds[0]
    assert item["lq"].shape == (3, 48, 64) and item["gt"].shape == (3, 48, 64)
    task, lq, gt = ds.records[0]
    np.testing.assert_array_equal(item["gt"].permute(1, 2, 0).numpy(), read_image(gt))
    np.testing.assert_array_equal(item["lq"].permute(1, 2, 0).numpy(), read_image(lq))
    assert os.path.basename(os.path.dirname(gt)) == "gt"
    # max_eval_images caps each task; a run on two of the three tasks sees only those
    ds = build_eval_dataset({"type": "allweather", "root": str(data), "max_eval_images": 1}, "allweather")
    assert len(ds) == 3
    ds = build_eval_dataset({"type": "allweather", "root": str(data)}, ["raindrop", "snow"])
    assert ds.tasks_present == ["raindrop", "snow"] and len(ds) == 4
    # whole images through the eval loader
    batch = next(iter(build_eval_loader(ds, 1)))
    assert batch["lq"].shape == (1, 3, 48, 64)


def test_allweather_missing_and_unreadable_files(tmp_path):
    data = make_transweather_tree(tmp_path / "data")
    gt = data / "train" / "allweather" / "gt" / "3_rain.png"
    gt.unlink()
    spec = {"type": "allweather", "root": str(data), "patch_size": 16}
    with pytest.raises(ImageReadError, match="3_rain.png") as err:
        build_train_dataset(spec, "allweather")
    assert err.value.path.endswith(os.path.join("gt", "3_rain.png"))
    # a listed input that does not exist, and an undecodable one
    with open(data / "train" / "allweather.txt", "a") as f:
        f.write("allweather/input/im_0009_s80_a04.png\n")
    (data / "train" / "allweather" / "input" / "im_0001_s80_a04.png").write_bytes(b"not an image")
    ds = build_train_dataset({**spec, "skip_bad_images": True}, ["snow", "rain_fog"])
    assert ds.num_bad_images == 2 and len(ds) == 3  # raindrop is not a task of this run: its line is left out
    bad = sorted(os.path.basename(p) for p in ds.bad_images)
    assert bad == ["im_0001_s80_a04.png", "im_0009_s80_a04.png"]  # undecodable; listed but absent
    with pytest.raises(ValueError, match="no usable images for task"):
        build_train_dataset({**spec, "skip_bad_images": True}, ["raindrop"])


def test_allweather_task_patterns_and_list_errors(tmp_path):
    data = make_transweather_tree(tmp_path / "data")
    spec = {"type": "allweather", "root": str(data), "patch_size": 16}
    # custom patterns (a mapping keeps its order); a line no pattern matches is an error naming it
    ds = build_train_dataset({**spec, "task_patterns": {"raindrop": "_rain\\.png$", "snow": "\\.jpg$",
                                                        "rain_fog": "^allweather/input/im_"}}, "allweather")
    assert sorted(t for t, _, _ in ds.records) == ["rain_fog", "rain_fog", "raindrop", "snow", "snow"]
    with pytest.raises(ValueError, match="no pattern matches the listed image 'allweather/input/3_rain.png'"):
        build_train_dataset({**spec, "task_patterns": [["snow", "jpg$"], ["rain_fog", "_s\\d+_a"]]}, ["snow", "rain_fog"])
    with pytest.raises(ValueError, match="bad regex"):
        build_train_dataset({**spec, "task_patterns": [["snow", "("]]}, "allweather")
    with pytest.raises(ValueError, match="no list file 'other.txt'"):
        build_train_dataset({**spec, "list_file": "other.txt"}, "allweather")
    (data / "train" / "allweather.txt").write_text("a b c\n")
    with pytest.raises(ValueError, match="expected 'INPUT' or 'INPUT GT'"):
        build_train_dataset(spec, "allweather")
    (data / "train" / "allweather.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="lists no images"):
        build_train_dataset(spec, "allweather")


def test_read_list_file_and_find_file(tmp_path):
    p = tmp_path / "l" / "x.txt"
    p.parent.mkdir()
    p.write_text("./a/input/1.png\n/real/2.png real_gt/2.png\r\n\n")
    assert read_list_file(p) == [("a/input/1.png", None), ("real/2.png", "real_gt/2.png")]
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "X.TXT").write_text("1")
    assert find_file(tmp_path, "x.txt") == p  # the shallowest match, case-insensitive
    assert find_file(tmp_path, "none.txt") is None
    assert outdoor_rain_gt_names("im_0042_s95_a06.png")[0] == "im_0042.png"
    assert raindrop_gt_names("17_rain.jpg")[0] == "17_clean.jpg"
    assert spa_gt_names("rain-001.png") == ["rain-001.png", "rain-001gt.png"]


# ----------------------------------------------------------------------------- the benchmarks' own folders

def test_snow100k_outdoor_rain_raindrop_folders(tmp_path):
    snow = tmp_path / "Snow100K"
    for split in ("all", "test/Snow100K-L", "test/Snow100K-S"):
        for k in range(2):
            _pair(snow / split / "synthetic" / f"s{k}.jpg", snow / split / "gt" / f"s{k}.jpg", k)
    rain = tmp_path / "outdoor_rain"
    for split in ("train", "test1"):
        for k in range(2):
            _pair(rain / split / "in" / f"im_000{k}_s80_a04.png", rain / split / "gt" / f"im_000{k}.png", k)
    drop = tmp_path / "RainDrop"
    for split in ("train", "test_a", "test_b"):
        for k in range(2):
            _pair(drop / split / "data" / f"{k}_rain.png", drop / split / "gt" / f"{k}_clean.png", k)
    for kind, root, task, n_eval in (("snow100k", snow, "snow", 2), ("outdoor_rain", rain, "rain_fog", 2),
                                     ("raindrop", drop, "raindrop", 2)):
        spec = {"type": kind, "root": str(root), "patch_size": 16, "augment": False}
        tr = build_train_dataset(spec, [task])
        ev = build_eval_dataset(spec, "allweather")
        assert len(tr) == 2 and len(ev) == n_eval and ev.tasks_present == [task]
        rel = lambda p: os.path.relpath(p, root)
        assert all("test" not in rel(lq) for _, lq, _ in tr.records)  # training never reads a held-out split
        assert all(("L" in rel(lq) or kind != "snow100k") and "test_b" not in rel(lq) for _, lq, _ in ev.records)
        _assert_window(tr[1], tr.records[1][1], tr.records[1][2])
        with pytest.raises(ValueError, match=f"type '{kind}' is task '{task}'"):
            build_train_dataset({**spec, "task": "derain"}, [task])


def test_gopro_in_tur_input_target_layout(tmp_path):
    # TUR's 5-task options read GoPro as Train/GoPro/{input,target} (Restormer's layout), not blur/sharp.
    for split in ("train", "test"):
        for k in range(2):
            _pair(tmp_path / "GoPro" / split / "input" / f"{k}.png", tmp_path / "GoPro" / split / "target" / f"{k}.png",
                  k)
    spec = {"type": "gopro", "root": str(tmp_path / "GoPro"), "patch_size": 16}
    assert len(build_train_dataset(spec, ["deblur"])) == 2 and len(build_eval_dataset(spec, ["deblur"])) == 2


# ----------------------------------------------------------------------------- real-world deweathering (TUR release)

def make_real_tree(root: Path, lists: bool = True) -> Path:
    """TUR's layout: data_dir/{real_rain/rain.txt, real_snow/snow.txt, real_fog/fog.txt} and the three folders;
    WGWS-Net's test folders under test/."""
    rain_ids, snow_ids, fog_ids, i = [], [], [], 0
    for scene in ("001", "017"):
        for k in (1, 2):
            name = f"{scene}_{k}-3.png"  # SPA+: <scene>_<k>-<frame>; gt <scene>_<k>.png in gt/<scene>/
            _pair(root / "real_rain" / "input" / scene / name, root / "real_rain" / "gt" / scene / f"{scene}_{k}.png", i)
            rain_ids.append(name)
            i += 1
    for name in ("snow_a.png", "snow_b.png"):
        _pair(root / "real_snow" / "input" / name, root / "real_snow" / "gt" / name, i)
        snow_ids.append(name)
        i += 1
    for video in ("W001", "W002"):
        _pair(root / "real_fog" / "Train" / "input" / video / "00001.JPG",
              root / "real_fog" / "Train" / "gt" / video / "00001.JPG", i)
        fog_ids.append(f"Train/input/{video}/00001.JPG")
        i += 1
    if lists:
        for folder, name, ids in (("real_rain", "rain.txt", rain_ids), ("real_snow", "snow.txt", snow_ids),
                                  ("real_fog", "fog.txt", fog_ids)):
            (root / "data_dir" / folder).mkdir(parents=True)
            (root / "data_dir" / folder / name).write_text("\n".join(ids) + "\n")
    t = root / "test"
    for k in range(2):
        _pair(t / "SPA+" / "real_test_1000" / "rain_jpg" / f"{k}.jpg", t / "SPA+" / "real_test_1000" / "gt_jpg" / f"{k}.jpg",
              k)
        _pair(t / "REVIDE" / "Test" / "hazy_re" / f"{k}.JPG", t / "REVIDE" / "Test" / "gt_re" / f"{k}.JPG", k + 2)
    _pair(t / "RealSnow" / "video2imgs_IN_testing_re" / "v.png", t / "RealSnow" / "video2imgs_GT_testing_re" / "v.png",
          5)
    return root


@pytest.mark.parametrize("lists", [True, False])
def test_real_weather_train_tur_layout(tmp_path, lists):
    root = make_real_tree(tmp_path / "real", lists=lists)
    ds = build_train_dataset({"type": "real_weather", "root": str(root), "patch_size": 16, "augment": False},
                             "real_weather")
    assert ds.tasks_present == list(REAL) and len(ds) == 4 + 2 + 2
    rel = {os.path.relpath(lq, root): os.path.relpath(gt, root) for _, lq, gt in ds.records}
    assert rel[os.path.join("real_rain", "input", "017", "017_2-3.png")] == os.path.join("real_rain", "gt", "017",
                                                                                          "017_2.png")
    assert rel[os.path.join("real_snow", "input", "snow_b.png")] == os.path.join("real_snow", "gt", "snow_b.png")
    assert rel[os.path.join("real_fog", "Train", "input", "W002", "00001.JPG")] == os.path.join(
        "real_fog", "Train", "gt", "W002", "00001.JPG")
    i = ds.task_ids.index(REAL.id("real_fog"))
    _assert_window(ds[i], ds.records[i][1], ds.records[i][2])


def test_real_weather_test_folders_and_errors(tmp_path):
    root = make_real_tree(tmp_path / "real")
    ds = build_eval_dataset({"type": "real_weather", "root": str(root)}, "real_weather")
    counts = {t: [ds.task_of(i) for i in range(len(ds))].count(t) for t in REAL}
    assert counts == {"real_rain": 2, "real_snow": 1, "real_fog": 2}
    assert all("/test/" in lq.replace(os.sep, "/") for _, lq, _ in ds.records)
    # SPA's own test naming: rain/NAME.png <-> gt/NAMEgt.png
    spa = tmp_path / "spa"
    _pair(spa / "real_rain" / "rain" / "r1.png", spa / "real_rain" / "gt" / "r1gt.png", 0)
    ds = build_eval_dataset({"type": "real_weather", "eval_root": str(spa)}, "real_weather")
    assert [os.path.basename(g) for _, _, g in ds.records] == ["r1gt.png"] and ds.tasks_present == ["real_rain"]
    # training needs each task's folder; evaluation needs a test split
    (root / "real_snow").rename(root / "elsewhere")
    with pytest.raises(ValueError, match="real_snow|RealSnow"):
        build_train_dataset({"type": "real_weather", "root": str(root)}, "real_weather")
    with pytest.raises(ValueError, match="no eval split for type 'real_weather'"):
        build_eval_dataset({"type": "real_weather", "root": str(root / "real_rain")}, "real_weather")
    with pytest.raises(ValueError, match="provides"):
        build_train_dataset({"type": "real_weather", "root": str(root)}, "3task")


def test_real_weather_list_entry_without_file(tmp_path):
    root = make_real_tree(tmp_path / "real")
    with open(root / "data_dir" / "real_rain" / "rain.txt", "a") as f:
        f.write("099_1-1.png\n")
    with pytest.raises(ImageReadError, match="099_1-1.png"):
        build_train_dataset({"type": "real_weather", "root": str(root)}, "real_weather")
    ds = build_train_dataset({"type": "real_weather", "root": str(root), "skip_bad_images": True}, "real_weather")
    assert ds.num_bad_images == 1 and len(ds) == 8


# ----------------------------------------------------------------------------- MiOIR 7-task pairs

def test_mio_train_and_test_trees(tmp_path):
    tasks7 = TaskSet("7task")
    df2k = tmp_path / "MiO" / "DF2K"
    test = tmp_path / "MiO" / "CL_test"
    for k in range(2):
        clean = _photo(k)
        _write(df2k / "GT_sub300" / f"000{k}_s001.png", clean)
        _write(test / "original" / "GT" / f"{k}.png", clean)
        for j, task in enumerate(tasks7):
            _write(df2k / f"{task}_sub300" / f"000{k}_s001.png", _weathered(clean, j))
            _write(test / "single_indis" / task / f"{k}.png", _weathered(clean, j))
    _write(df2k / "blur" / "stray.png", _photo(3))  # a folder without the _sub300 suffix is not this tree's
    spec = {"type": "mio", "root": str(tmp_path / "MiO"), "patch_size": 16, "augment": False}
    tr = build_train_dataset(spec, "7task")
    ev = build_eval_dataset(spec, "7task")
    assert len(tr) == 14 and len(ev) == 14 and tr.tasks_present == list(tasks7) == ev.tasks_present
    for t, lq, gt in tr.records:
        assert Path(lq).parent.name == f"{t}_sub300" and Path(gt).parent.name == "GT_sub300"
        assert Path(lq).name == Path(gt).name
    i = tr.task_ids.index(tasks7.id("sr"))
    _assert_window(tr[i], tr.records[i][1], tr.records[i][2])
    # a missing task folder is an error for training, an absent task for evaluation
    (df2k / "dark_sub300").rename(df2k / "moved")
    with pytest.raises(ValueError, match=r"no usable images for task\(s\) \['dark'\]"):
        build_train_dataset(spec, "7task")
    with pytest.raises(ValueError, match="no GT/ or GT_sub<N>/"):
        build_train_dataset({**spec, "train_root": str(tmp_path)}, "7task")
    with pytest.raises(ValueError, match="no eval split for type 'mio'"):
        build_eval_dataset({"type": "mio", "root": str(df2k)}, "7task")
