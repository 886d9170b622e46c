"""End-to-end throughput of one TUR training step against one L1 step: forward under bf16 autocast, the loss,
backward, AdamW step. TUR = the backbone with its uncertainty head + ``tur_ext.task_uncertainty_loss``; L1 = the
plain backbone + ``F.l1_loss``. The two steps are timed interleaved (median of each) so both see the same load.

On CUDA: nafnet-w32 and PromptIR at the published sizes, batch 8, 128 x 128 (issue 12). On a CPU (``--tiny``,
the default there): nafnet-tiny and a scaled-down PromptIR at batch 2, 32 x 32, float32, to check that the script
runs, not to measure. Results: a JSON and a Markdown table under benchmarks/results/ (``--out`` to change).

    python benchmarks/bench_train_step.py [--rounds N] [--tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import tur_ext
from tur_ext.models import build

NUM_TASKS = 5
PROMPTIR_SMALL = dict(dim=16, num_blocks=[1, 1, 1, 2], num_refinement_blocks=1, prompt_dims=[16, 32, 64],
                      prompt_sizes=[32, 16, 8], include_unused=False)


def cases(tiny: bool) -> List[Dict]:
    if tiny:
        return [dict(label="nafnet-tiny", arch="nafnet-tiny", config={}, batch=2, size=32),
                dict(label="promptir-small", arch="promptir", config=PROMPTIR_SMALL, batch=2, size=32)]
    return [dict(label="nafnet-w32", arch="nafnet-w32", config={}, batch=8, size=128),
            dict(label="promptir", arch="promptir", config={}, batch=8, size=128)]


def make_step(case: Dict, loss: str, device: str, amp: bool) -> Callable[[], float]:
    torch.manual_seed(0)
    model = build(case["arch"], uncertainty=loss == "tur", **case["config"]).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(case["batch"], 3, case["size"], case["size"], generator=g)
    target = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1).to(device)
    x = x.to(device)
    ids = (torch.arange(case["batch"]) % NUM_TASKS).to(device)

    def step() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        if loss == "tur":
            image, u = out
            # The loss in the model's output dtype (bf16 under autocast); no host sync in the step.
            value = tur_ext.task_uncertainty_loss(image, target.to(image.dtype), u.to(image.dtype), ids, NUM_TASKS,
                                                  check_finite=False).loss
        else:
            value = F.l1_loss(out.float(), target)
        value.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="small models and sizes (the default without CUDA)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or device == "cpu"
    amp = device == "cuda"
    rounds = args.rounds or (30 if device == "cuda" else 3)
    rows = []
    for case in cases(tiny):
        steps = {loss: make_step(case, loss, device, amp) for loss in ("l1", "tur")}
        for s in steps.values():  # warm-up: allocator, cuDNN autotuning, optimiser state
            s(), s()
        times: Dict[str, List[float]] = {"l1": [], "tur": []}
        for _ in range(rounds):
            for loss, s in steps.items():
                times[loss].append(s())
        l1, tur = statistics.median(times["l1"]), statistics.median(times["tur"])
        rows.append(dict(case=case["label"], arch=case["arch"], batch=case["batch"], size=case["size"], device=device,
                         dtype="bf16-autocast" if amp else "float32", rounds=rounds, l1_step_s=l1, tur_step_s=tur,
                         tur_over_l1=tur / l1, l1_img_per_s=case["batch"] / l1, tur_img_per_s=case["batch"] / tur,
                         loss_backend=tur_ext.ops.backend()))
        print(f"{case['label']}: L1 {l1 * 1e3:.1f} ms, TUR {tur * 1e3:.1f} ms, TUR/L1 {tur / l1:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_train_step_{device}{'_tiny' if tiny and device == 'cuda' else ''}"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| case | batch | size | dtype | L1 step (ms) | TUR step (ms) | TUR / L1 | TUR img/s |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['batch']} | {r['size']} | {r['dtype']} | {r['l1_step_s'] * 1e3:.1f} | "
                     f"{r['tur_step_s'] * 1e3:.1f} | {r['tur_over_l1']:.3f} | {r['tur_img_per_s']:.1f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
