"""Loss forward + backward at SmolLM2-135M dimensions (hidden 576, vocab 49152): peak memory above the inputs, and time.

    python benchmarks/loss_memory.py [--sizes 8x256,8x1024] [--repeats 2] [--out benchmarks/results/loss_memory.json]

Methods, each from the same hidden states and LM-head weights (float32, CPU), each case in a fresh process:
  naive     logits for the whole batch, our `losses.py` on them (what the trainer does with `loss_chunk_size=None`)
  peer      logits for the whole batch, `trl.experimental.sdft.loss_utils` on them
  chunked   ours, `chunked_loss.chunked_loss` with `--chunk` tokens per chunk (`loss_chunk_size`; the default, 128,
            and half of it)
  liger     Liger's fused linear JSD, once per sequence (`use_liger_kernel`; full_logits only)
  trl       TRL's `ChunkedDivergenceFunction` (full_logits only), for reference
Peak extra memory: the process's peak RSS (VmHWM, reset just before the loss) minus its RSS with the inputs built,
in a run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the system at once (otherwise glibc keeps
chunk-sized blocks and RSS overstates what is live). Time: mean wall time of `--repeats` forward+backward passes after
one warm-up pass, in a separate run with the default allocator (mmap for every block slows small chunks down).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HIDDEN, VOCAB = 576, 49152
MODES = {
    "full_logits": dict(alpha=0.5),
    "topk_logits": dict(alpha=0.5, topk=100),
    "sampled_token": dict(alpha=1.0),
}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_case(method: str, mode: str, batch: int, length: int, chunk: int, repeats: int) -> dict:
    import torch

    from trl_sdft import chunked_loss, losses

    torch.manual_seed(0)
    spec = losses.LossSettings(mode=mode, chunk_size=chunk, **MODES[mode])
    student_hidden = torch.randn(batch, length, HIDDEN, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, HIDDEN)
    student_weight = (torch.randn(VOCAB, HIDDEN) * 0.05).requires_grad_(True)
    teacher_weight = torch.randn(VOCAB, HIDDEN) * 0.05
    token_ids = torch.randint(0, VOCAB, (batch, length))
    mask = torch.ones(batch, length)

    def naive_logits():
        return chunked_loss.project(student_hidden, student_weight, 1.0), chunked_loss.project(
            teacher_hidden, teacher_weight, 1.0
        )

    def naive():
        student, teacher = naive_logits()
        per_token, *_ = losses.per_token_loss(spec, student, teacher.detach(), token_ids)
        return losses.sequence_mean(per_token, mask)

    def peer():
        from trl.experimental.sdft import loss_utils

        student, teacher = naive_logits()
        teacher = teacher.detach()
        if mode == "full_logits":
            per_token = loss_utils.compute_full_logit_self_distillation_loss(
                student, teacher, distillation_alpha=spec.alpha
            )
        elif mode == "topk_logits":
            per_token = loss_utils.compute_topk_self_distillation_loss(
                student,
                teacher,
                distillation_topk=spec.topk,
                distillation_alpha=spec.alpha,
                distillation_add_tail=False,
            )
        else:
            per_token = loss_utils.compute_sampled_token_self_distillation_loss(
                student, teacher, token_ids, distillation_alpha=1.0
            )
        return losses.sequence_mean(per_token, mask)

    def chunked():
        return chunked_loss.chunked_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, token_ids, mask, spec
        )[0]

    def liger():
        return chunked_loss.liger_jsd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask, spec.alpha, chunk_size=chunk
        )[0]

    def trl_kernel():
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        divergence, _ = ChunkedDivergenceFunction.apply(
            student_hidden.reshape(-1, HIDDEN),
            student_weight,
            None,
            teacher_hidden.reshape(-1, HIDDEN),
            teacher_weight,
            None,
            spec.alpha,
        )
        return losses.sequence_mean(divergence.view(batch, length), mask)

    fn = {"naive": naive, "peer": peer, "chunked": chunked, "liger": liger, "trl": trl_kernel}[method]
    base = rss_kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    times = []
    for index in range(repeats + 1):
        start = time.perf_counter()
        fn().backward()
        elapsed = time.perf_counter() - start
        if index or not repeats:
            times.append(elapsed)
        student_hidden.grad = student_weight.grad = None
    peak = rss_kib("VmHWM:")
    return {
        "method": method,
        "mode": mode,
        "size": f"{batch}x{length}",
        "chunk": chunk if method in ("chunked", "liger") else None,
        "peak_extra_mib": round((peak - base) / 1024),
        "seconds": round(sum(times) / len(times), 3),
    }


def measure(method: str, mode: str, size: str, chunk: int, repeats: int) -> dict | None:
    """Memory from a run with mmap'd allocations, time from a run with the default allocator; None if it failed (e.g.
    out of memory)."""
    outputs = []
    for env, runs in (({"MALLOC_MMAP_THRESHOLD_": "65536"}, 0), ({}, repeats)):
        command = [sys.executable, __file__, "--repeats", str(runs), "--case", method, mode, size, str(chunk)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode != 0:
            print(f"{method} {mode} {size}: failed ({done.returncode})\n{done.stderr[-1500:]}", file=sys.stderr)
            return None
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {**outputs[1], "peak_extra_mib": outputs[0]["peak_extra_mib"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8x256,8x1024")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/loss_memory.json")
    parser.add_argument("--case", nargs=4, metavar=("METHOD", "MODE", "SIZE", "CHUNK"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.case:
        method, mode, size, chunk = options.case
        batch, length = map(int, size.split("x"))
        print(json.dumps(run_case(method, mode, batch, length, int(chunk), options.repeats)))
        return
    results = []
    for size in options.sizes.split(","):
        for mode in MODES:
            methods = [("naive", 0), ("peer", 0), ("chunked", options.chunk), ("chunked", options.chunk // 2)]
            if mode == "full_logits":
                methods += [("liger", options.chunk), ("trl", 0)]
            for method, chunk in methods:
                result = measure(method, mode, size, chunk, options.repeats)
                if result is not None:
                    results.append(result)
                    print(json.dumps(result), flush=True)
    for result in results:
        naive = next(
            (
                r
                for r in results
                if r["method"] == "naive" and r["mode"] == result["mode"] and r["size"] == result["size"]
            ),
            None,
        )
        if naive is None:
            continue
        result["memory_vs_naive"] = round(result["peak_extra_mib"] / max(naive["peak_extra_mib"], 1), 3)
        result["time_vs_naive"] = round(result["seconds"] / naive["seconds"], 2)
    os.makedirs(os.path.dirname(options.out), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump({"hidden": HIDDEN, "vocab": VOCAB, "chunk": options.chunk, "results": results}, f, indent=2)
    print("| size | mode | method | peak extra (MiB) | x naive | time (s) | x naive |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']} | {r['mode']} | {r['method']} | {r['peak_extra_mib']} | {r['memory_vs_naive']} | "
            f"{r['seconds']} | {r['time_vs_naive']} |"
        )


if __name__ == "__main__":
    main()
