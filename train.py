"""Train one of the study's CNNs on Tiny ImageNet shards (torchvision references/classification style).

    python train.py --arch lenet5 --recipe paper                  # the study's LeNet-5 row
    python train.py --arch alexnet --size 224 --pretrained        # ImageNet weights, 64x64 upscaled to 224
    torchrun --nproc_per_node 4 train.py --arch resnet18 --amp    # DDP, one process per GPU

Writes to --output-dir: args.json, env.json, metrics.jsonl/.csv (one row per epoch),
checkpoint.pth (every epoch; resume with --resume auto), best.pth (best val top-1) and
final.json (test-split accuracy of the final model, total wall time).
"""

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import platform
import random
import socket
import sys
import time

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from tqdm import tqdm

import models
from models.recipes import recipe_names, resolve_recipe
from pipeline import IMAGENET_MEAN, IMAGENET_STD, make_loader, read_manifest

NORMS = {"dataset": (None, None), "imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}
FIELDS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s", "epoch_time_s"]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (metrics are kept as sums so the mean is exact)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def autocast(device, args):
    """bf16 autocast: a CUDA-only speed-up here (CPU bf16 is slower than fp32 on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


def train_one_epoch(model, criterion, optimizer, loader, device, epoch, args, keys=None):
    """One pass over this rank's train split; returns global (loss, top-1 %, images)."""
    model.train()
    loader.set_epoch(epoch)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n: no per-step sync
    batches = itertools.islice(loader, args.limit_batches)  # islice(x, None): everything
    bar = tqdm(batches, desc=f"epoch {epoch}", total=min(len(loader), args.limit_batches or len(loader)),
               disable=True if rank() else None, leave=False)
    for step, batch in enumerate(bar):
        images, target = batch[0], batch[1]
        if keys is not None:
            keys.extend(batch[2])
        with autocast(device, args):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = target.numel()
        sums[0] += loss.detach() * n
        sums[1] += (output.argmax(1) == target).sum()
        sums[2] += n
        if step % 20 == 0 and not bar.disable:  # .item() syncs with the GPU: only now and then
            bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.3f}")
    loss_sum, correct, n = reduce_sum(sums).tolist()
    return loss_sum / n, 100 * correct / n, int(n)


@torch.no_grad()  # not inference_mode: the loader's gather thread writes into buffers made here
def evaluate(model, criterion, loader, device, args):
    """Loss, top-1 and top-5 (%) over the whole split, summed across ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n
    for images, target in itertools.islice(loader, args.limit_batches):
        with autocast(device, args):
            output = model(images)
        hits = output.topk(min(5, output.shape[1]), dim=1).indices == target[:, None]  # (B, k), ranked
        n = target.numel()
        sums[0] += criterion(output.float(), target) * n
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += n
    loss_sum, top1, top5, n = reduce_sum(sums).tolist()
    return dict(loss=loss_sum / n, top1=100 * top1 / n, top5=100 * top5 / n)


def load_data(args, device, world_size):
    """Train/val/test loaders for the model's variant, resized on the device when --size asks."""
    info = models.model_input(args.arch)
    mean, std = (v if v is None else v[: info["channels"]] for v in NORMS[args.norm])  # grey: one channel
    common = dict(variant=info["variant"], size=None if args.size == info["native"] else args.size,
                  mean=mean, std=std, batch_size=args.batch_size, seed=args.seed, rank=rank(),
                  world_size=world_size, device=device, workers=args.workers, channels_last=args.channels_last,
                  path=args.data_path)
    # drop_last under DDP so every rank takes the same number of steps (DDP all-reduces each one).
    train = make_loader(args.shards, "train", shuffle=True, drop_last=world_size > 1, augment=args.augment,
                        with_keys=args.dump_keys, **common)
    val, test = (make_loader(args.shards, split, shuffle=False, **common) for split in ("val", "test"))
    return train, val, test


def make_scheduler(optimizer, args, last_epoch=-1):
    """The lr multiplier per epoch in closed form, so a resumed run may extend --epochs exactly."""
    if args.lr_scheduler == "step":
        factor = lambda epoch: args.lr_gamma ** (epoch // args.lr_step_size)  # noqa: E731
    elif args.lr_scheduler == "cosine":
        factor = lambda epoch: 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))  # noqa: E731
    else:
        factor = lambda epoch: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)


def save_atomic(obj, path):
    """torch.save to a temp name then rename, so a crash never leaves half a checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def write_metrics(out, history, append=None):
    """Rewrite metrics.jsonl/.csv from `history`, or append one row to them."""
    rows, mode = ([append], "a") if append else (history, "w")
    with open(os.path.join(out, "metrics.jsonl"), mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "metrics.csv"), mode, newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if mode == "w":
            w.writeheader()
        w.writerows(rows)


def cpu_name():
    try:  # Linux names the CPU model here; platform.processor() is often just "x86_64"
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device, world_size):
    """What the numbers were measured on (env.json)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                device=str(device), device_name=name, world_size=world_size, hostname=socket.gethostname(),
                time=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), argv=sys.argv)


def init_distributed(args):
    """Join torchrun's process group when launched by it; returns (device, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:  # torchrun put RANK, LOCAL_RANK and MASTER_ADDR in the environment
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    return device, world_size


def rng_state(device):
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [])


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def main(args):
    device, world_size = init_distributed(args)
    main_rank = rank() == 0
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    num_classes = len(read_manifest(args.shards)["classes"])
    try:
        model = models.get_model(args.arch, num_classes, pretrained=args.pretrained, weights=args.weights)
    except models.WeightsUnavailable as e:
        sys.exit(f"error: {e}")
    torch.manual_seed(args.seed + rank())  # but different dropout masks
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    model_without_ddp = model
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = torch.optim.SGD(model_without_ddp.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    lr_scheduler = make_scheduler(optimizer, args)
    train_loader, val_loader, test_loader = load_data(args, device, world_size)

    start_epoch, best_acc, history, wall = 0, 0.0, [], 0.0
    ckpt_path = os.path.join(out, "checkpoint.pth")
    resume = ckpt_path if args.resume == "auto" else args.resume
    if resume and (args.resume != "auto" or os.path.exists(ckpt_path)):
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        model_without_ddp.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # Rebuilt, not loaded: the schedule follows this run's --epochs (cosine's length).
        lr_scheduler = make_scheduler(optimizer, args, last_epoch=ckpt["epoch"])
        start_epoch, best_acc, history, wall = ckpt["epoch"] + 1, ckpt["best_acc"], ckpt["history"], ckpt["wall_time"]
        set_rng_state(ckpt["rng"], device)  # so the resumed run continues exactly as an uninterrupted one
        if main_rank:
            print(f"resumed from {resume} after epoch {ckpt['epoch']}")

    if args.test_only:
        result = {split: evaluate(model, criterion, loader, device, args) for split, loader in (("val", val_loader), ("test", test_loader))}
        if main_rank:
            print(json.dumps(result))
            with open(os.path.join(out, "eval.json"), "w") as f:
                json.dump(result, f, indent=2)
        if dist.is_initialized():
            dist.destroy_process_group()
        return result

    def save_checkpoint(epoch, path=ckpt_path):
        save_atomic(dict(model=model_without_ddp.state_dict(), optimizer=optimizer.state_dict(),
                         lr_scheduler=lr_scheduler.state_dict(), epoch=epoch, args=vars(args), best_acc=best_acc,
                         history=history, wall_time=wall, rng=rng_state(device)), path)

    if main_rank:
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        with open(os.path.join(out, "env.json"), "w") as f:
            json.dump(environment(device, world_size), f, indent=2)
        write_metrics(out, history)  # a fresh run truncates; a resumed one drops rows past its checkpoint
        if start_epoch == 0:
            save_checkpoint(-1)  # the untrained state, so Ctrl-C in epoch 0 is resumable too

    saved = start_epoch - 1  # the epoch checkpoint.pth ends with
    try:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            keys = [] if args.dump_keys else None
            train_loss, train_top1, n = train_one_epoch(model, criterion, optimizer, train_loader, device, epoch, args, keys)
            train_time = time.time() - t0
            val = evaluate(model, criterion, val_loader, device, args)
            row = dict(epoch=epoch, lr=optimizer.param_groups[0]["lr"], train_loss=train_loss, train_top1=train_top1,
                       val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                       images_per_s=n / train_time, epoch_time_s=time.time() - t0)
            lr_scheduler.step()
            history.append(row)
            wall += row["epoch_time_s"]
            is_best = len(history) == 1 or val["top1"] > best_acc
            best_acc = max(best_acc, val["top1"])
            if keys is not None:  # --dump-keys: every rank writes what it trained on
                with open(os.path.join(out, f"keys-rank{rank()}.txt"), "a") as f:
                    f.writelines(f"{epoch} {k}\n" for k in keys)
            if main_rank:
                print(f"epoch {epoch}: train loss {train_loss:.4f} top1 {train_top1:.2f} | val loss {val['loss']:.4f} "
                      f"top1 {val['top1']:.2f} top5 {val['top5']:.2f} | {row['images_per_s']:.0f} img/s {row['epoch_time_s']:.1f}s")
                write_metrics(out, history, append=row)
                save_checkpoint(epoch)
                if is_best:
                    save_checkpoint(epoch, os.path.join(out, "best.pth"))
            saved = epoch
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted: {ckpt_path} holds the state after epoch {saved}; "
                  f"continue with --resume auto --output-dir {out}", file=sys.stderr)
        sys.exit(130)

    test = evaluate(model, criterion, test_loader, device, args)
    last = history[-1] if history else {}
    final = dict(arch=args.arch, size=args.size, epochs=len(history), test_top1=test["top1"], test_top5=test["top5"],
                 test_loss=test["loss"], train_top1=last.get("train_top1"), val_top1=last.get("val_top1"),
                 best_val_top1=best_acc, wall_time_s=wall)  # wall: train + val time of every epoch, across resumes
    if main_rank:
        print(f"test top1 {test['top1']:.2f} top5 {test['top5']:.2f} | wall {wall:.1f}s")
        with open(os.path.join(out, "final.json"), "w") as f:
            json.dump(final, f, indent=2)
    if dist.is_initialized():
        dist.destroy_process_group()
    return final


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser(prog="train.py", description="Train a CNN on Tiny ImageNet shards", add_help=add_help)
    p.add_argument("--shards", default="out/shards", help="shard folder from `tinyin shard build` (default: out/shards)")
    p.add_argument("--arch", "--model", default="resnet18", choices=models.list_models(), help="network (default: resnet18)")
    p.add_argument("--size", type=int, choices=(28, 64, 224),
                   help="input size: 28 grey (lenet5), 64 RGB, 224 = RGB 64 upscaled on the device (default: the arch's native size)")
    p.add_argument("--recipe", choices=recipe_names(),
                   help="a named recipe for --arch/--size (models/recipes.py): paper = the study's Table 2 and Table 3's "
                        "10-epoch rows, paper-50 = Table 3's 50-epoch rows; explicit flags still win (default: none)")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="images per step per process (default: 128)")
    p.add_argument("--epochs", type=int, default=30, help="epochs to train (default: 30)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    p.add_argument("--lr-scheduler", choices=("none", "step", "cosine"), default="cosine", help="lr schedule (default: cosine)")
    p.add_argument("--lr-step-size", type=int, default=10, help="epochs between decays for step (default: 10)")
    p.add_argument("--lr-gamma", type=float, default=0.1, help="decay factor for step (default: 0.1)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default: 0.0)")
    p.add_argument("--augment", action="store_true", help="random crop with padding + flip on train (default: off)")
    p.add_argument("--norm", choices=tuple(NORMS),
                   help="input normalisation: the train split's mean/std, imagenet, or half (mean = std = 0.5, the study's LeNet-5) (default: imagenet with --pretrained, else dataset)")
    p.add_argument("-j", "--workers", type=int, default=2, help="loader workers per process, stream path only (default: 2)")
    p.add_argument("--limit-batches", type=int, default=None, metavar="N",
                   help="quick runs: at most N batches per epoch of each split (default: all)")
    p.add_argument("--data-path", choices=("auto", "resident", "fast", "stream"), default="auto",
                   help="loader read path: resident (split copied to the device once), fast (memory-mapped shards), "
                        "stream (webdataset); auto = resident when the split fits in 2 GiB (default: auto)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (default: off)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, dropout and the shuffle order (default: 0)")
    p.add_argument("--output-dir", help="where logs and checkpoints go (default: runs/ARCH-SIZE)")
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' for OUTPUT_DIR/checkpoint.pth if present (default: none)")
    p.add_argument("--test-only", action="store_true", help="only evaluate val and test, writing eval.json (default: off)")
    p.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights (default: off)")
    p.add_argument("--weights", metavar="FILE", help="start from a local state dict or checkpoint (default: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dump-keys", action="store_true", help=argparse.SUPPRESS)  # debug: keys-rank{r}.txt per rank
    return p


def parse_args(argv=None):
    """Parse argv, apply --recipe under the explicit flags, fill derived defaults, validate."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    # Which flags were typed? Parse again with every default None: what is set was given.
    probe = get_args_parser()
    probe.set_defaults(**dict.fromkeys(vars(args)))
    given = {k for k, v in vars(probe.parse_args(argv)).items() if v is not None}

    info = models.model_input(args.arch)
    if args.size is None:
        args.size = info["native"]
    if args.size not in info["sizes"]:
        parser.error(f"argument --size: {args.arch} takes {' or '.join(map(str, info['sizes']))}, not {args.size}")
    if args.recipe:
        try:
            recipe = resolve_recipe(args.recipe, args.arch, args.size)
        except ValueError as e:
            parser.error(f"argument --recipe: {e}")
        if "weights" in given:  # a local weights file stands in for the download
            recipe.pop("pretrained", None)
        for k, v in recipe.items():
            if k not in given:
                setattr(args, k, v)
    if args.pretrained and args.weights:
        parser.error("use --pretrained or --weights FILE, not both")
    if args.pretrained and models.model_spec(args.arch).weights is None:
        parser.error(f"argument --pretrained: {args.arch} has no pretrained ImageNet weights")
    args.norm = args.norm or ("imagenet" if args.pretrained else "dataset")
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.arch}-{args.size}")
    return args


if __name__ == "__main__":
    main(parse_args())
