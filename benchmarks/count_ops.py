"""Operator calls of one bare training step, by phase: what BENCHMARKS' "Step cost" counts.

    python benchmarks/count_ops.py --setups features main-job --methods dmil joint

For each setup of `dmil profile --train-step` (batch 64, DMIL in stage 3, each method built with the same seed,
fused AdamW, as that command runs them) and each method: trainable parameter tensors, autograd nodes of the loss, and
the aten calls (nested calls included, as torch.profiler lists them) of the forward pass with labels, the backward
pass and the AdamW step with `zero_grad`, averaged over 10 steps after 5 warm-up steps. The counts do not depend on
the machine's speed.
"""

import argparse
import collections
import copy

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dmil_hf.methods import build_model, method_of
from dmil_hf.profiling import random_inputs, train_step_setup

PHASES = ("forward", "backward", "optimizer")


def autograd_nodes(tensor) -> int:
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def count(setup: str, method: str, batch_size: int = 64, steps: int = 10) -> dict:
    config, cached = train_step_setup(setup)
    generator = torch.Generator().manual_seed(0)
    inputs = random_inputs(config, batch_size, 32, generator, cached)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=generator)
    torch.manual_seed(0)
    model = build_model(method, copy.deepcopy(config))
    if method_of(model).staged:
        model.set_training_stage(3)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)

    def step():
        with record_function("forward"):
            loss = model(**inputs, labels=labels).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    nodes = autograd_nodes(model(**inputs, labels=labels).loss)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.events()
    ranges = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in PHASES]
    calls = collections.Counter()
    for event in events:
        if event.name.startswith("aten::"):
            phase = next((name for name, start, end in ranges
                          if start <= event.time_range.start and event.time_range.end <= end), "other")
            calls[phase] += 1
    result = {"setup": setup, "method": method, "parameter_tensors": len(trainable), "autograd_nodes": nodes}
    result.update({phase: calls[phase] / steps for phase in PHASES})
    result["total"] = sum(calls[phase] for phase in PHASES) / steps
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["features", "main-job"])
    parser.add_argument("--methods", nargs="+", default=["dmil", "joint"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for setup in args.setups:
        for method in args.methods:
            r = count(setup, method)
            print(f"{setup:9s} {method:6s} parameter tensors {r['parameter_tensors']:4d}  autograd nodes "
                  f"{r['autograd_nodes']:4d}  aten calls: forward {r['forward']:6.0f}  backward {r['backward']:6.0f}  "
                  f"optimizer {r['optimizer']:5.0f}  total {r['total']:6.0f}")


if __name__ == "__main__":
    main()
