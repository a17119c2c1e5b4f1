"""Throughput and overhead of the training stack, measured side by side in one run.

Prints samples/s of the pretrain and virface stages as
  1. a bare PyTorch loop of the same backbone and head (no loader, no logging),
  2. the core stage loop (``run_stage``) in one process,
  3. the stage loop as a one-worker Tune trial (in the trial's process),
  4. the stage loop as a Tune trial with 2 workers (a Ray Train ``TorchTrainer``, gloo on CPU),
and, for pretrain, a hand-written 2-process DDP loop (torch.multiprocessing, gloo) over the same
images and global batch: the 2-worker trial's samples/s over it is the ratio printed.

Then the overhead of Ray Train against one process, on the same stage: the fixed cost of a
trial that does (almost) no training (one step, no evaluation; 1 and 2 workers, against the
same run in one process and Tune's no-op floor), and the time a whole 2-epoch run spends
outside its training steps (start-up, checkpoints, reports, shutdown).

    python benchmarks/throughput.py            # about 6 minutes on 2 idle cores
    python benchmarks/throughput.py --quick    # about 3 minutes: fewer steps and trials
    python benchmarks/throughput.py --smoke    # 2 steps, every figure once but the 2-worker
                                               # overhead trial: what the tests run

The Tune trials run on a Ray of the script's own (this machine's CPUs), or on the cluster at
$RAY_ADDRESS, whose other jobs then share the figures' machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from virface.config import TrainConfig  # noqa: E402

SYNTHETIC = {"n_labeled_ids": 100, "images_per_labeled_id": 10, "n_unlabeled_ids": 300,
             "n_val_ids": 20, "val_pairs": 100}


def stage_config(method: str, steps: int, pretrained: str | None = None, **kw) -> TrainConfig:
    # Two epochs: the second one's samples/s is compared, so no figure includes first-step costs.
    return TrainConfig(method=method, arch="mobilefacenet_s", label_batch_size=64, unlabel_batch_size=64,
                       steps_per_epoch=steps, max_epoch=2, eval=False, tensorboard=False, device="cpu",
                       synthetic=SYNTHETIC, pretrained_file=pretrained, **kw)


def bare_loop(config: TrainConfig, steps: int) -> float:
    """samples/s of a hand-written pretrain loop over the same backbone, head and optimiser."""
    from virface.backbones import build_backbone
    from virface.data.images import normalize_pixels
    from virface.heads import ArcFaceHead

    backbone = build_backbone(config.arch, feat_len=512, input_size=32)
    head = ArcFaceHead(100, 512)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01, momentum=0.9,
                          weight_decay=1e-3)
    images = torch.randint(0, 256, (config.label_batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 100, (config.label_batch_size,))
    backbone.train()

    def step():
        x = normalize_pixels(images)
        loss = torch.nn.functional.cross_entropy(head(backbone(x), labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * config.label_batch_size / (time.perf_counter() - start)


class _BackboneAndHead(torch.nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, y):
        return self.head(self.backbone(x), y)


def _ddp_rank(rank: int, port: int, config: TrainConfig, steps: int, out: str) -> None:
    import torch.distributed as dist

    from virface.backbones import build_backbone
    from virface.data.images import normalize_pixels
    from virface.data.loading import build_stage_data
    from virface.heads import ArcFaceHead

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        labeled = build_stage_data(config).labeled
        images = torch.from_numpy(labeled.images).permute(0, 3, 1, 2)
        labels = torch.as_tensor(labeled.labels)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_BackboneAndHead(
            build_backbone(config.arch, feat_len=512, input_size=32), ArcFaceHead(labeled.num_classes, 512)))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
        local = config.label_batch_size // 2
        g = torch.Generator().manual_seed(1000 + rank)

        def step():
            index = torch.randint(0, len(images), (local,), generator=g)
            x, y = normalize_pixels(images[index]), labels[index]
            flip = torch.rand(local, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(model(x, y), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"samples_per_s": steps * config.label_batch_size / elapsed}, f)
    finally:
        dist.destroy_process_group()


def handwritten_ddp(config: TrainConfig, steps: int, work: str) -> float:
    """samples/s (global) of a hand-written 2-process DDP pretrain loop (gloo) over the stage's
    own labeled images, at the same global batch: what a 2-worker trial is compared to."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = os.path.join(work, "ddp.json")
    mp.spawn(_ddp_rank, args=(port, config, steps, out), nprocs=2, join=True)
    with open(out) as f:
        return json.load(f)["samples_per_s"]


def core_loop(config: TrainConfig, work: str) -> tuple[float, float]:
    """(samples/s of the second epoch, seconds of the run outside its training steps: start-up,
    evaluation, checkpoints, reports, shutdown), in one process."""
    from virface.stages import run_stage

    start = time.perf_counter()
    result = run_stage(config, os.path.join(work, f"core-{config.method}"))
    wall = time.perf_counter() - start
    return result.history[-1]["samples_per_s"], wall - sum(m["epoch_time_s"] for m in result.history)


def tune_trial(config: TrainConfig, storage: str, workers: int, name: str) -> tuple[float, float]:
    """(samples/s reported by the trial's second epoch, seconds of the whole Tune run outside the
    trial's training steps)."""
    from ray import tune

    from virface.search.space import ResourcesSpec
    from virface.search.trial import TrialSetup, run_trial, trial_resources

    setup = TrialSetup(stage=config.method, base_config=config.to_dict(),
                       upstream_checkpoint=config.pretrained_file,
                       tb_root=os.path.join(storage, name, "tb"), train_storage=os.path.join(storage, name),
                       metric="loss", mode="min", resources=ResourcesSpec(workers=workers))
    base = {k: v for k, v in config.to_dict().items() if k != "pretrained_file"}
    setup.base_config = base
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    start = time.perf_counter()
    results = tune.Tuner(trainable, param_space={}, tune_config=tune.TuneConfig(num_samples=1),
                         run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
    wall = time.perf_counter() - start
    result = results[0]
    if result.error:
        raise RuntimeError(f"{name}: {result.error}")
    training = float(result.metrics_dataframe["epoch_time_s"].sum())
    return result.metrics["samples_per_s"], wall - training


def trial_overhead(storage: str, workers: int, n_trials: int, name: str) -> float:
    """Seconds per trial of trials that train one step, evaluate nothing and checkpoint once."""
    from ray import tune

    from virface.search.space import ResourcesSpec
    from virface.search.trial import TrialSetup, run_trial, trial_resources

    config = stage_config("pretrain", steps=1).replace(label_batch_size=8, max_epoch=1)
    setup = TrialSetup(stage="pretrain", base_config=config.to_dict(), upstream_checkpoint=None,
                       tb_root=os.path.join(storage, name, "tb"), train_storage=os.path.join(storage, name),
                       metric="loss", mode="min", resources=ResourcesSpec(workers=workers))
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_resources(setup))
    start = time.perf_counter()
    tune.Tuner(trainable, param_space={"seed": tune.grid_search(list(range(n_trials)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=workers == 1),
               run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0)).fit()
    return (time.perf_counter() - start) / n_trials


def one_process_overhead(work: str, n_runs: int) -> float:
    """Seconds per run of the same one-step stage run in this process (no Ray)."""
    from virface.stages import run_stage

    config = stage_config("pretrain", steps=1).replace(label_batch_size=8, max_epoch=1)
    start = time.perf_counter()
    for k in range(n_runs):
        run_stage(config.replace(seed=k), os.path.join(work, f"onestep-{k}"))
    return (time.perf_counter() - start) / n_runs


def noop_trial_overhead(storage: str, n_trials: int) -> float:
    """Seconds per trial of a Tune function trial that only reports once (Tune's own floor)."""
    from ray import tune

    def noop(config):
        tune.report({"loss": 0.0})

    start = time.perf_counter()
    tune.Tuner(tune.with_resources(noop, {"cpu": 1}),
               param_space={"i": tune.grid_search(list(range(n_trials)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
               run_config=tune.RunConfig(name="noop", storage_path=storage, verbose=0)).fit()
    return (time.perf_counter() - start) / n_trials


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="8 steps an epoch, 3 trials per overhead figure (2 for the 2-worker one)")
    size.add_argument("--smoke", action="store_true",
                      help="2 steps an epoch, 1 trial per overhead figure, none for the 2-worker one (the 2-worker "
                           "throughput trials run): the script runs, the figures mean little")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    steps = 2 if args.smoke else 8 if args.quick else 100
    n_trials = 1 if args.smoke else 3 if args.quick else 6
    torch.set_num_threads(1)        # one CPU per worker, as Ray gives each trial and rank
    figures: dict[str, float] = {"load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as work:
        from virface.ray_train import ray_cluster
        from virface.stages import run_stage

        os.environ.setdefault("VIRFACE_CACHE_DIR", os.path.join(work, "cache"))
        pre = run_stage(stage_config("pretrain", 3).replace(max_epoch=1),
                        os.path.join(work, "upstream-pre")).last_checkpoint
        gen = run_stage(stage_config("generator", 3, pre).replace(max_epoch=1),
                        os.path.join(work, "upstream-gen")).last_checkpoint
        configs = {"pretrain": stage_config("pretrain", steps),
                   "virface": stage_config("virface", steps, gen)}
        figures["bare_pretrain"] = bare_loop(configs["pretrain"], steps)
        figures["ddp_handwritten_pretrain_w2"] = handwritten_ddp(configs["pretrain"], steps, work)
        for stage, config in configs.items():
            figures[f"core_{stage}"], figures[f"core_{stage}_outside_training_s"] = core_loop(config, work)
        figures["overhead_one_process_s"] = one_process_overhead(work, n_trials)
        # A Ray of its own (this machine's CPUs), or the cluster at $RAY_ADDRESS.
        with ray_cluster(None, log_to_driver=False):
            storage = os.path.join(work, "ray")
            for stage, config in configs.items():
                for workers in (1, 2):
                    sps, outside = tune_trial(config, storage, workers, f"{stage}_w{workers}")
                    figures[f"ray_{stage}_w{workers}"] = sps
                    figures[f"ray_{stage}_w{workers}_outside_training_s"] = outside
            figures["overhead_noop_tune_s"] = noop_trial_overhead(storage, n_trials)
            figures["overhead_trial_w1_s"] = trial_overhead(storage, 1, n_trials, "overhead_w1")
            if not args.smoke:      # another Ray Train trial (~35 CPU-s on 2 cores) for a figure that means little there
                figures["overhead_trial_w2_s"] = trial_overhead(storage, 2, max(2, n_trials // 2), "overhead_w2")
    figures["load_average_end"] = os.getloadavg()[0]

    print(f"\nthroughput (samples/s, 1 CPU thread per process; {os.cpu_count()} cores; load average "
          f"{figures['load_average_start']:.1f} at the start, {figures['load_average_end']:.1f} at the end)")
    print(f"  pretrain  bare loop                   {figures['bare_pretrain']:8.1f}")
    print(f"  pretrain  hand-written DDP, 2 procs   {figures['ddp_handwritten_pretrain_w2']:8.1f}")
    for stage in ("pretrain", "virface"):
        core = figures[f"core_{stage}"]
        print(f"  {stage:<9} core loop                   {core:8.1f}")
        for w in (1, 2):
            v = figures[f"ray_{stage}_w{w}"]
            engine = "in the trial's process" if w == 1 else "Ray Train, 2 workers  "
            print(f"  {stage:<9} Tune trial, {engine} {v:8.1f}   ratio to core loop {v / core:.3f}")
    print(f"  pretrain  core / bare ratio     {figures['core_pretrain'] / figures['bare_pretrain']:.3f}")
    ratio = figures["ray_pretrain_w2"] / figures["ddp_handwritten_pretrain_w2"]
    print(f"  pretrain  2-worker Ray Train trial / hand-written 2-process DDP: {ratio:.3f} (goal >= 0.9)")
    print("fixed cost per run (s; a one-step stage, no evaluation; sequential)")
    print(f"  one process, no Ray                     {figures['overhead_one_process_s']:.2f}")
    print(f"  Tune no-op function trial               {figures['overhead_noop_tune_s']:.2f}")
    print(f"  stage trial, 1 worker (in-process)      {figures['overhead_trial_w1_s']:.2f}")
    if "overhead_trial_w2_s" in figures:
        print(f"  stage trial, 2 workers (Ray Train)      {figures['overhead_trial_w2_s']:.2f}")
    else:
        print("  stage trial, 2 workers (Ray Train)      not measured with --smoke")
    print("a 2-epoch run's time outside its training steps (s; start-up, checkpoints, reports, shutdown)")
    for stage in ("pretrain", "virface"):
        print(f"  {stage:<9} one process {figures[f'core_{stage}_outside_training_s']:.2f}   "
              f"Tune trial 1 worker {figures[f'ray_{stage}_w1_outside_training_s']:.2f}   "
              f"Ray Train 2 workers {figures[f'ray_{stage}_w2_outside_training_s']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
