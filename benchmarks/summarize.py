"""Turns bench_loss.py's pytest-benchmark JSON into a markdown table: per configuration, the time of each variant
(the minimum over rounds: on a shared 2-core machine the median mostly measures the neighbours), the ratios the
targets are stated in, what the CPU kernel's SIMD dispatch buys over its portable SSE2 build, and the fused op's
achieved GB/s against the copy ceiling measured in the same run.

    python benchmarks/summarize.py benchmarks/results/bench_loss_cpu.json > benchmarks/results/bench_loss_cpu.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def summarize(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows: dict[str, dict] = defaultdict(dict)
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "variant" not in info:
            continue
        key = f"B={info['B']} {info['size']}² K={info['K']} Cu={info['Cu']}"
        rows[key][info["variant"]] = (b["stats"]["min"], info)
    machine = data.get("machine_info", {})
    lines = [
        f"Device: {next(iter(rows.values()))['fused'][1]['device'] if rows else '?'}; "
        f"CPU: {machine.get('cpu', {}).get('brand_raw', '?')}; run {data.get('datetime', '?')}",
        "",
        "| config | fused ms | plain L1 ms | fused / L1 | reference / fused | loop / fused | compiled ref / fused "
        "| SSE2 fused / fused | fused GB/s | copy GB/s | % of copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, v in rows.items():
        if "fused" not in v:
            continue
        fused, info = v["fused"]
        ratio = lambda name: f"{v[name][0] / fused:.2f}" if name in v else "–"
        gbps = info["min_bytes"] / fused / 1e9
        copy = v["copy"][1]["copy_bytes"] / v["copy"][0] / 1e9 if "copy" in v else float("nan")
        lines.append(
            f"| {key} | {fused * 1e3:.2f} | {v['plain_l1'][0] * 1e3:.2f} | {v['plain_l1'][0] and fused / v['plain_l1'][0]:.2f} "
            f"| {ratio('reference')} | {ratio('loop')} | {ratio('compiled_reference')} | {ratio('fused_default_simd')} "
            f"| {gbps:.1f} | {copy:.1f} | {100 * gbps / copy:.0f}% |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/summarize.py BENCH_JSON")
    sys.stdout.write(summarize(sys.argv[1]))
