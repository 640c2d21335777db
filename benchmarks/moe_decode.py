"""Decode of one mixture-of-experts layer on CPU in bfloat16 against its active-bytes roofline.

Run from the repository root:
    .venv/bin/python -m benchmarks.moe_decode                     # batch 1, Qwen3-30B-A3B / 2
    .venv/bin/python -m benchmarks.moe_decode --tokens 1 4 --repeats 30

The default shape is Qwen3-30B-A3B's experts halved in width (128 experts, top 8, hidden
1024, expert intermediate 384; ~300 MB of expert weights). At decode batch 1 a layer needs
only its k active experts' weights (k * 3 * H * I bf16 = 18.9 MB), so its floor is those
bytes over the machine's read bandwidth (by default the reference measurement of this host,
31 GB/s, /work/shared/reference); the fraction printed is roofline / measured time.

Each timed call routes to experts none of the previous 15 calls used (the router logits
rotate through all 128), so their weights come from memory, as in a real step where the
other layers' weights evict them. Columns:
    layer   FusedExperts.forward: routing in torch + the one native call (engine.ops.moe_bf16)
    kernel  the native call alone, routing precomputed
    torch   the grouped torch path (FusedExperts before prepack), for reference
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.attention_kernels import measure_bandwidth, time_samples
from engine import ops
from engine.layers.moe import FusedExperts, MoERouting, route

# Read-only bandwidth measured on the development machine (/work/shared/reference): a sum
# over 256-512 MiB, ~31 GB/s with one or two processes.
REFERENCE_READ_GBPS = 31.0


def rotating_logits(num_tokens: int, num_experts: int, top_k: int, step: int) -> torch.Tensor:
    """Logits whose top k are experts [k * step, k * step + k) mod E, one set per token
    offset by the token index, with a random tail so the weights are not uniform."""
    gen = torch.Generator().manual_seed(step)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    for t in range(num_tokens):
        first = (top_k * (step + t)) % num_experts
        chosen = [(first + j) % num_experts for j in range(top_k)]
        logits[t, chosen] += 20.0
    return logits.bfloat16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=48)
    parser.add_argument("--no-torch", action="store_true", help="skip the torch path column")
    parser.add_argument("--bandwidth-gbps", type=float, default=REFERENCE_READ_GBPS,
                        help="read bandwidth of the roofline (default: the reference "
                             "measurement; a sum over 1 GiB is also measured and printed, but "
                             "on a busy shared host it reads far below the machine's capability)")
    args = parser.parse_args()
    if not ops.linear_bf16_available():
        raise SystemExit("the MoE kernel needs AVX512_BF16 and a C++ toolchain")

    E, k, H, inter = args.experts, args.top_k, args.hidden, args.intermediate
    routing = MoERouting(E, k, renormalize=True)
    experts = FusedExperts(E, H, inter, routing, dtype=torch.bfloat16, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        experts.w13.normal_(0.0, H**-0.5)
        experts.w2.normal_(0.0, inter**-0.5)
    plain = FusedExperts(E, H, inter, routing, dtype=torch.bfloat16, device="cpu")
    plain.load_expert(None, "gate_up_proj", experts.w13.detach())
    plain.load_expert(None, "down_proj", experts.w2.detach())
    experts.prepack()

    expert_bytes = 3 * H * inter * 2
    read_best, read_median = measure_bandwidth(5)["read"]
    print(f"threads {torch.get_num_threads()}; roofline at {args.bandwidth_gbps:.1f} GB/s "
          f"(measured now: {read_best:.1f} best, {read_median:.1f} median); "
          f"E={E} top_k={k} H={H} I={inter}: {E * expert_bytes / 1e6:.0f} MB of experts")
    print("ms per call as best / median (the best is the machine's capability on a shared "
          "host, as for the bandwidth); 'of roof' = roofline / best")
    print(f"{'tokens':>6} {'active MB':>9} {'roofline ms':>11} | {'layer ms':>15} {'of roof':>7} | "
          f"{'kernel ms':>15} {'of roof':>7} | {'torch ms':>15}")

    num_steps = -(-E // k)  # calls before an expert is reused
    for num_tokens in args.tokens:
        x = torch.randn(num_tokens, H).bfloat16()
        steps = [rotating_logits(num_tokens, E, k, s) for s in range(num_steps)]
        routed = [route(logits, routing) for logits in steps]
        routed = [(weights.float(), ids) for weights, ids in routed]
        active = len(torch.unique(torch.cat([ids.reshape(-1) for _, ids in routed[:1]])))
        active_bytes = active * expert_bytes
        roofline = active_bytes / (args.bandwidth_gbps * 1e9)
        counter = iter(range(10**9))

        def layer() -> None:
            experts(x, steps[next(counter) % num_steps])

        def kernel() -> None:
            weights, ids = routed[next(counter) % num_steps]
            ops.moe_bf16(x, ids, weights, experts.packed_gate_up, experts.packed_down, inter, True)

        def torch_path() -> None:
            plain(x, steps[next(counter) % num_steps])

        layer_s = best_and_median(layer, args.repeats)
        kernel_s = best_and_median(kernel, args.repeats)
        torch_s = (float("nan"), float("nan")) if args.no_torch else best_and_median(
            torch_path, max(5, args.repeats // 4))
        print(f"{num_tokens:>6} {active_bytes / 1e6:>9.1f} {roofline * 1e3:>11.3f} | "
              f"{ms(layer_s)} {roofline / layer_s[0]:>7.0%} | "
              f"{ms(kernel_s)} {roofline / kernel_s[0]:>7.0%} | {ms(torch_s)}")


def best_and_median(fn, repeats: int) -> tuple[float, float]:
    samples = time_samples(fn, repeats)
    return min(samples), statistics.median(samples)


def ms(best_median: tuple[float, float]) -> str:
    return f"{best_median[0] * 1e3:>7.3f} / {best_median[1] * 1e3:>5.2f}"

if __name__ == "__main__":
    main()
