"""The `recognizer` command: synth, shard, train, eval, predict, info and keygen."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from recognizer import recipe
from recognizer.augment import AUGMENTS, AugmentConfig
from recognizer.backgrounds import BACKGROUND_SETS
from recognizer.charset import ALPHABETS
from recognizer.device import DEVICES, WORKERS_HELP
from recognizer.fonts import FONT_SETS
from recognizer.progress import Progress, add_progress_arguments
from recognizer.recipe import DEFAULT_BATCH_SIZE, DEFAULT_OPTIMIZER, OPTIMIZERS, RECIPE, RECIPES
from recognizer.shard import MODES
from recognizer.vocabulary import LABEL_KINDS

log = logging.getLogger("recognizer")


def parse_gamma(text: str) -> float | None:
    """``1``, ``0.25`` or ``1/4`` → a float in (0, 1]; ``none`` → None (no hashing, a baseline)."""
    try:
        return recipe.parse_gamma(text)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's message, not a ValueError's
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _key_path(args: argparse.Namespace) -> Path:
    """The --key file, or the model file's name with .key (what `recognizer train` writes)."""
    return Path(args.key) if args.key else Path(args.model).with_suffix(".key")


class _Given(argparse.Action):
    """Store the value and note that the user gave it, so a --recipe fills in only what was not given."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


# The train options a named recipe (recognizer.recipe.NamedRecipe) sets when they are not given.
RECIPE_OPTIONS = ("preset", "optimizer", "batch_size", "epochs", "lr", "cosine_from",
                  "augment", "augment_ops", "augment_magnitude", "augment_prob", "average")


def _apply_recipe(args: argparse.Namespace) -> None:
    """Fill the train options the user did not give from ``args.recipe`` (nothing without one)."""
    if args.recipe is None:
        return
    named = RECIPES[args.recipe]
    for option in RECIPE_OPTIONS:
        if option not in getattr(args, "given", ()):
            setattr(args, option, getattr(named, option))
    log.info("recipe %s: %s", named.name, ", ".join(f"{o}={getattr(args, o)}" for o in RECIPE_OPTIONS))


def _add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model runs: auto (default: cuda when torch.cuda.is_available(), "
                        "else cpu), cpu or cuda (an error when there is none)")


def cmd_keygen(args: argparse.Namespace) -> int:
    from recognizer.keys import generate_key

    generate_key(Path(args.out))
    print(f"wrote a new 32-byte key to {args.out} (a federation key, or an image key)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from recognizer.synth import Sources, render_dataset

    styles = args.styles.split(",") if args.styles else None
    sources = Sources(args.fonts, tuple(args.font_dir), args.backgrounds, tuple(args.background_dir))
    with Progress(args.count, "rendering", unit="image", rate_unit="images", mode=args.progress,
                  every=args.progress_every) as progress:
        stats = render_dataset(Path(args.out), args.count, args.seed, styles, labels=args.labels,
                               sources=sources, workers=args.workers, progress=progress.update_to)
    print(json.dumps(stats, indent=2, default=str))
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from recognizer.shard import shard_statistics, split_dataset

    out = Path(args.out)
    paths = split_dataset(Path(args.input), args.parts, out, args.split, args.seed, alpha=args.alpha)
    stats = [shard_statistics(p) for p in paths]
    for row in stats:
        styles = " ".join(f"{k}:{v}" for k, v in row["styles"].items())
        kinds = " ".join(f"{k}:{v}" for k, v in row["label_kinds"].items())
        print(f"{row['shard']}  {row['size']} samples  styles {styles}  labels {kinds}", file=sys.stderr)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _apply_recipe(args)
    if args.cosine_from is not None and not 0 <= args.cosine_from < args.epochs:
        raise ValueError(
            f"--cosine-from {args.cosine_from} must be within 0..{args.epochs - 1} (--epochs {args.epochs})"
        )
    if args.average and not 0.0 < args.average < 1.0:
        raise ValueError(f"--average {args.average} must be a decay in (0, 1), or 0 for the last weights")
    import torch

    from fedocr.schedule import cosine_lr
    from recognizer.dataset import make_loader
    from recognizer.device import default_bf16, default_workers, resolve_device
    from recognizer.keys import KEY_BYTES, load_key, write_key
    from recognizer.model import build_model
    from recognizer.model_io import save_model, start_from
    from recognizer.recipe import DEFAULT_LR
    from recognizer.state import fingerprint
    from recognizer.train import WeightAverage, evaluate, lr_at, make_optimizer, set_lr, train_epoch

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bf16 = default_bf16(device) if args.bf16 is None else args.bf16
    workers = default_workers(device) if args.workers is None else args.workers
    pin = device.type == "cuda"
    key_path = Path(args.key) if args.key else Path(args.out).with_suffix(".key")
    new_key = not key_path.exists()  # a new key is written beside the model, never before it
    key = os.urandom(KEY_BYTES) if new_key else load_key(key_path)
    torch.manual_seed(args.seed)  # batch order and dropout; the weights come from the key
    model = build_model(args.preset, key, args.gamma, args.alphabet)
    data = {**model.image_options, "pin_memory": pin}
    augment = None if args.augment == "none" else AugmentConfig(
        args.augment_ops, args.augment_magnitude, args.augment_prob)
    loader = make_loader([Path(p) for p in args.data], args.batch_size, shuffle=True,
                         workers=workers, seed=args.seed, check_labels=True, augment=augment, **data)
    val = make_loader(Path(args.val), args.batch_size, shuffle=False, **data) if args.val else None
    initial_fingerprint = fingerprint(model, key)  # of W_0, recorded in the model file
    if args.init:
        start_from(model, Path(args.init), key, args.preset, initial_fingerprint)
        log.info("starting from %s", args.init)
    model.to(device)  # before the optimizer, which keeps its state beside the parameters
    log.info("training on %s (bf16 autocast %s, %d data-loading workers)", device,
             "on" if bf16 else "off", workers)
    base_lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    optimizer = make_optimizer(model, base_lr, args.optimizer)
    average = WeightAverage(model, args.average) if args.average else None
    history = []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        lr = lr_at(epoch, base_lr, args.decay_epochs)
        if args.cosine_from is not None:  # evaluated mid-epoch: the last epoch ends near the floor
            lr = cosine_lr(epoch + 0.5, lr, args.cosine_from, args.epochs)
        set_lr(optimizer, lr)
        with Progress(len(loader), f"epoch {epoch + 1}/{args.epochs}", rate_unit="images",
                      mode=args.progress, every=args.progress_every) as progress:
            stats = train_epoch(model, loader, optimizer, epoch=epoch, bf16=bf16, device=device,
                                progress=progress,
                                on_batch=None if average is None else lambda _s, _l: average.update(model))
        row = {"epoch": epoch + 1, "lr": float(f"{lr:.4g}"), "loss": round(stats.loss, 4),
               "images_per_s": round(stats.images_per_second, 1)}
        if val is not None:
            result = evaluate(model, val, beam_width=args.beam, device=device)
            row.update(val_accuracy=round(result.accuracy, 4), val_loss=round(result.loss, 4))
        history.append(row)
        log.info("epoch %s", row)
    if new_key:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        write_key(key_path, key)
        log.info("created federation key %s", key_path)
    summary = {"model": args.out, "key": str(key_path), "seconds": round(time.perf_counter() - started, 1),
               "history": history}
    if average is not None:  # the last weights beside the averaged ones, which OUT holds
        last = Path(args.out).with_suffix(".last.npz")
        save_model(last, model, key, args.preset, initial_fingerprint)
        average.copy_to(model)
        summary.update(average=args.average, last_weights=str(last))
    save_model(Path(args.out), model, key, args.preset, initial_fingerprint)
    if args.recipe or augment:  # runs without either print what they always have
        summary.update(recipe=args.recipe, augment=args.augment, augment_ops=args.augment_ops,
                       augment_magnitude=args.augment_magnitude, augment_prob=args.augment_prob)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from recognizer.dataset import make_loader
    from recognizer.device import default_workers, resolve_device
    from recognizer.keys import load_key
    from recognizer.model_io import load_model
    from recognizer.train import evaluate

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    workers = default_workers(device) if args.workers is None else args.workers
    key = load_key(_key_path(args))
    model, meta = load_model(Path(args.model), key, device=device)
    loader = make_loader(Path(args.data), args.batch_size, shuffle=False, workers=workers,
                         pin_memory=device.type == "cuda", **model.image_options)
    with Progress(len(loader), "evaluating", unit="batch", rate_unit="images", mode=args.progress,
                  every=args.progress_every) as progress:
        result = evaluate(model, loader, beam_width=args.beam, device=device, progress=progress)
    report = {"model": args.model, "data": args.data, "preset": meta["preset"], "gamma": meta["gamma"],
              "accuracy": result.accuracy, "char_accuracy": result.char_accuracy, "loss": result.loss,
              "samples": result.samples}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.data}: accuracy {100 * result.accuracy:.2f}% on {result.samples} words, "
              f"1-NED {result.char_accuracy:.3f} (loss {result.loss:.3f}, {meta['preset']}, "
              f"gamma {meta['gamma']})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from recognizer.dataset import load_image_file
    from recognizer.device import resolve_device
    from recognizer.keys import load_key
    from recognizer.model_io import load_model

    device = resolve_device(args.device)
    key = load_key(_key_path(args))
    model, _ = load_model(Path(args.model), key, device=device)
    c = model.config
    if args.image_key:  # encrypted here, as a client does before it sends an image to a service
        from recognizer.dataset import array_to_tensor, load_image_array
        from recognizer.image_crypt import BlockCipher, EncryptionOptions

        options = EncryptionOptions.parse(args.transforms)
        cipher = BlockCipher.for_model(load_key(Path(args.image_key)), model, options)
        arrays = [load_image_array(Path(p), c.input_hw, c.keep_aspect) for p in args.images]
        images = torch.stack([array_to_tensor(cipher.encrypt(a)) for a in arrays])
    else:
        images = torch.stack([load_image_file(Path(p), c.input_hw, c.keep_aspect) for p in args.images])
    images = images.to(device)
    for path, ids in zip(args.images, model.predict(images, beam_width=args.beam), strict=True):
        print(f"{path}\t{model.alphabet.decode(ids)}")
    return 0


def cmd_encrypt(args: argparse.Namespace) -> int:
    from recognizer.image_crypt import EncryptionOptions, cipher_for_preset, encrypt_dataset
    from recognizer.keys import load_key
    from recognizer.lmdb_data import LmdbReader
    from recognizer.model import resolve_preset

    config = resolve_preset(args.preset)
    options = EncryptionOptions.parse(args.transforms)
    cipher = cipher_for_preset(load_key(Path(args.image_key)), args.preset, options)
    count = len(LmdbReader(Path(args.data)))
    with Progress(count, "encrypting", unit="image", rate_unit="images", mode=args.progress,
                  every=args.progress_every) as progress:
        written = encrypt_dataset(Path(args.data), Path(args.out), cipher, config.input_hw,
                                  config.keep_aspect, progress.update_to)  # fmt: skip
    print(json.dumps({"data": args.data, "out": args.out, "samples": written, "preset": config.name,
                      "transforms": options.describe()}))  # fmt: skip
    return 0


def cmd_encrypt_model(args: argparse.Namespace) -> int:
    from recognizer import state
    from recognizer.image_crypt import EncryptionOptions, encrypt_model, image_key_fingerprint, token_order_of
    from recognizer.keys import load_key
    from recognizer.model import build_model
    from recognizer.model_io import load_model, save_model

    key, image_key = load_key(_key_path(args)), load_key(Path(args.image_key))
    model, meta = load_model(Path(args.model), key)
    options = EncryptionOptions.parse(args.transforms)
    encrypted = encrypt_model(model, image_key, options)
    fingerprint = state.fingerprint(build_model(meta["preset"], key, None, meta["alphabet"]), key)
    extra = {"image_key": image_key_fingerprint(image_key), "transforms": options.describe(),
             "token_order": token_order_of(encrypted)}
    save_model(Path(args.out), encrypted, key, meta["preset"], fingerprint, extra=extra)
    print(f"wrote {args.out}: {meta['preset']} reading images encrypted with image key "
          f"{extra['image_key']} ({extra['transforms']}); unhashed, for serving")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from recognizer.model import model_info

    info = model_info(args.preset, args.gamma)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['preset']} gamma={info['gamma']}: virtual {info['virtual_params']:,} "
          f"real {info['real_params']:,} state {info['state_bytes'] / 2**20:.2f} MiB")
    for layer in info["layers"]:
        print(f"  {layer['name']:<48} {layer['virtual']:>10,} -> {layer['real']:>10,} ({layer['ratio']:.3f})")
    return 0


TRANSFORMS_HELP = ("image encryption transforms, comma-separated: blocks (scrambling), pixels (shuffling "
                   "within blocks), negate (negative-positive), channels (shuffling); default all")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `recognizer` command."""
    parser = argparse.ArgumentParser(prog="recognizer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="write a new 32-byte federation key")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("synth", help="render synthetic word images into an LMDB")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--styles", help="comma-separated style families (default: the eight classic ones; "
                                    "varied: any font and background, every text effect at random)")
    p.add_argument("--labels", choices=tuple(LABEL_KINDS), default="mixed",
                   help="words, numbers and codes (mixed), dictionary words of up to 10 letters in "
                        "varied case (words), digit strings (digits), words of up to 25 characters with "
                        "compounds, apostrophes and numbers (general) or words of 11-25 letters (long)")
    p.add_argument("--fonts", choices=FONT_SETS, default="classic",
                   help="font families: the nine packaged ones (classic, default), the training or held-out "
                        "side of the fixed family split, all, or only those of --font-dir (dirs)")
    p.add_argument("--font-dir", action="append", default=[], metavar="DIR",
                   help="a directory of .ttf/.otf faces to add (repeatable)")
    p.add_argument("--backgrounds", choices=BACKGROUND_SETS, default="classic",
                   help="each style's own (classic, default), the training or held-out generator kinds, "
                        "all, or only crops of --background-dir images (dirs)")
    p.add_argument("--background-dir", action="append", default=[], metavar="DIR",
                   help="a directory of images to crop backgrounds from (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (same output for any)")
    add_progress_arguments(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("shard", help="split an LMDB into C shards")
    p.add_argument("--input", required=True)
    p.add_argument("--parts", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=MODES, default="iid",
                   help="iid, style (each shard dominated by its home style family), or a Dirichlet(alpha) "
                        "draw over style families or label kinds (words, digits, codes)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration; small: skewed shards")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="train on one or more LMDBs (single or centralized manner)")
    p.add_argument("--data", action="append", required=True, help="an LMDB; repeat to pool several")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named recipe (recognizer/recipe.py) that sets preset, optimizer, batch size, "
                        "epochs, lr, cosine and augmentation where not given; general: a recognizer for "
                        "text it was not rendered for (its data: recognizer synth "
                        f"{' '.join(RECIPES['general'].synth_argv('OUT')[1:])}, and "
                        f"{' '.join(RECIPES['general'].long_argv('LONG')[1:])})")
    p.add_argument("--preset", default="fedocr-cpu", action=_Given)
    p.add_argument("--alphabet", choices=sorted(ALPHABETS),
                   help="symbols the model reads (default: the preset's, alnum36: case-insensitive "
                        "digits and letters); labels are folded to it")
    p.add_argument("--gamma", type=parse_gamma, default=1.0)
    p.add_argument("--epochs", type=int, default=RECIPE.epochs, action=_Given)
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--key", help="federation key file (default: OUT with .key; created when missing)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, action=_Given)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER, action=_Given,
                   help="adam (default: learns fastest on a CPU, benchmarks/learning.py), adamw, or "
                        "adadelta as in the paper")
    p.add_argument("--lr", type=float, action=_Given,
                   help="base learning rate (default: 0.002 adam/adamw, 1.0 adadelta)")
    p.add_argument("--decay-epochs", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=list(RECIPE.decay_at),
                   help="epochs at which lr drops x0.1, x0.01 (e.g. 5,30)")
    p.add_argument("--cosine-from", type=int, metavar="EPOCH", action=_Given,
                   help="hold the lr for this many epochs, then decay it along a cosine to 1%% at the "
                        "end of the last (after the take-off; benchmarks/learning.py, row cosine-1500)")
    p.add_argument("--augment", choices=AUGMENTS, default="none", action=_Given,
                   help="change training images at random as they are read: none (default) or straug (warp, "
                        "geometry, noise, blur, weather, camera and process ops; recognizer/augment.py)")
    p.add_argument("--augment-ops", type=int, default=AugmentConfig.ops, action=_Given, metavar="N",
                   help="ops drawn per image (default %(default)s)")
    p.add_argument("--augment-magnitude", type=float, default=AugmentConfig.magnitude, action=_Given,
                   metavar="M", help="strength in [0, 1]: each op's level is drawn in [M/2, M] "
                                     "(default %(default)s)")
    p.add_argument("--augment-prob", type=float, default=AugmentConfig.prob, action=_Given, metavar="P",
                   help="probability that each drawn op is applied (default %(default)s)")
    p.add_argument("--average", type=float, default=0.0, action=_Given, metavar="DECAY",
                   help="write a moving average of the weights (decay in (0, 1), e.g. 0.999: about the "
                        "last 1,000 steps) to OUT and the last weights to OUT with .last.npz "
                        "(default 0: the last weights only)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from this model file's weights instead of W_0 (fine-tuning): same preset, "
                        "gamma, alphabet and --key")
    p.add_argument("--val", help="an LMDB evaluated after each epoch")
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--workers", type=int, help=WORKERS_HELP)
    p.add_argument("--seed", type=int, default=0)
    _add_device_argument(p)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast on the device (default: on for cuda when the GPU supports "
                        "bfloat16, off for cpu; --bf16 turns it on for cpu too)")
    p.add_argument("--threads", type=int, default=2)
    add_progress_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="word accuracy of a model on an LMDB")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--key", help="federation key file (default: MODEL with .key)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, help=WORKERS_HELP)
    _add_device_argument(p)
    p.add_argument("--json", action="store_true")
    add_progress_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="read the words in image files")
    p.add_argument("--model", required=True)
    p.add_argument("--key", help="federation key file (default: MODEL with .key)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--image-key", help="encrypt each image with this image key before reading it (a model "
                   "made by encrypt-model)")  # fmt: skip
    p.add_argument("--transforms", default="all", help=TRANSFORMS_HELP)
    _add_device_argument(p)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("encrypt", help="encrypt an LMDB's images with an image key (vit presets)")
    p.add_argument("--data", required=True, help="the LMDB to encrypt")
    p.add_argument("--out", required=True, help="the encrypted LMDB to write (PNG, the model's input size)")
    p.add_argument("--image-key", required=True, help="a 32-byte key file (recognizer keygen)")
    p.add_argument("--preset", default="vitstr-tiny", help="the vit preset that will read the images")
    p.add_argument("--transforms", default="all", help=TRANSFORMS_HELP)
    add_progress_arguments(p)
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("encrypt-model", help="turn a model into one that reads images encrypted with a key")
    p.add_argument("--model", required=True, help="a model file of a vit preset, trained on plain images")
    p.add_argument("--key", help="federation key file (default: MODEL with .key)")
    p.add_argument("--image-key", required=True, help="the image key the images are encrypted with")
    p.add_argument("--transforms", default="all", help=TRANSFORMS_HELP)
    p.add_argument("--out", required=True, help="the transformed (unhashed) model file to write")
    p.set_defaults(func=cmd_encrypt_model)

    p = sub.add_parser("info", help="parameter counts of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--gamma", type=parse_gamma, default=1.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `recognizer` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # the project's errors name the file or the setting
        print(f"recognizer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
