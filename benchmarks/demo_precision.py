"""The demo (`configs/demo.yaml`) in float32 and in bf16 mixed precision, over seeds: which should the demo use?

    python benchmarks/demo_precision.py [--seeds 42 43 44] [--out benchmarks/results/demo_precision.json]

Runs `scripts/sdft.py --config configs/demo.yaml --seed S --bf16 {false,true}` alternating the two precisions for each
seed (fresh process each), and reports the final facts / paraphrases / probes accuracies and the wall time of each run,
with the mean per precision. Do not run anything heavy beside it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(seed: int, bf16: bool, out_root: str) -> dict:
    output_dir = os.path.join(out_root, f"seed{seed}-{'bf16' if bf16 else 'fp32'}")
    command = [sys.executable, os.path.join(ROOT, "scripts", "sdft.py"), "--config", "configs/demo.yaml"]
    command += ["--seed", str(seed), "--bf16", str(bf16).lower(), "--output_dir", output_dir]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"seed {seed} bf16={bf16} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(output_dir, "results.json")) as f:
        results = json.load(f)

    def counts(record):
        return {name: [value["correct"], value["total"]] for name, value in record.items() if isinstance(value, dict)}

    return {
        "seed": seed,
        "bf16": bf16,
        "wall_s": round(seconds, 1),
        "baseline": counts(results["baseline"]),
        "final": counts(results["final"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--out", default="benchmarks/results/demo_precision.json")
    parser.add_argument("--work_dir", default="/tmp/trl-sdft-demo-precision")
    options = parser.parse_args()
    runs = []
    for seed in options.seeds:
        for bf16 in (False, True):
            runs.append(run(seed, bf16, options.work_dir))
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for bf16 in (False, True):
        group = [r for r in runs if r["bf16"] == bf16]
        summary["bf16" if bf16 else "fp32"] = {
            "wall_s": round(statistics.mean(r["wall_s"] for r in group), 1),
            **{name: round(statistics.mean(r["final"][name][0] for r in group), 2) for name in group[0]["final"]},
        }
    os.makedirs(os.path.dirname(options.out) or ".", exist_ok=True)
    with open(options.out, "w") as f:
        json.dump({"runs": runs, "mean": summary}, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
