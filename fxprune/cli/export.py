"""`fxprune export DIR --format hf|gguf|pt2 --output OUT`: a saved fxprune directory (from
`fxprune prune`, `fxprune.save` or `fxprune tune --merged`) to a standard format. Every check that
can refuse runs on the directory's config and safetensors header before the model is loaded."""
from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("hf", "gguf", "pt2")


def add_parser(sub) -> None:
    """Register the `export` subcommand and its options on the argparse `sub` parsers."""
    x = sub.add_parser("export", help="write a pruned directory as a Hugging Face checkpoint, GGUF or .pt2 program")
    x.add_argument("model", help="fxprune directory (from fxprune prune / fxprune.save / fxprune tune --merged)")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--output", required=True, help="new directory (hf) or file (gguf, pt2); never overwritten")
    x.add_argument("--dtype", default="f16", choices=["f16", "f32"], help="gguf: tensor type of the matrices")
    x.add_argument("--tokenizer-gguf", default=None,
                   help="gguf: copy the tokenizer of this GGUF file (default: the embedded SmolLM2 GGUF "
                        "when its vocabulary matches)")
    x.add_argument("--aoti", action="store_true", help="pt2: an AOTInductor package (compiled) instead of a program")
    x.set_defaults(fn=cmd_export)


def saved_description(directory: Path) -> tuple[dict, dict]:
    """(base description, tensor shapes) of a saved fxprune directory, read without loading tensors."""
    from safetensors import safe_open
    from fxprune.serialization import missing_files
    from fxprune.streaming.weights import checkpoint_files
    missing = missing_files(directory)
    if missing:
        raise FileNotFoundError(f"{directory} is not an fxprune directory: missing {', '.join(missing)}")
    meta = json.loads((directory / "fxprune.json").read_text())
    base = {"architecture": meta["architecture"], "config": json.loads((directory / "config.json").read_text())}
    shapes = {}
    for name in dict.fromkeys(checkpoint_files(directory).values()):
        with safe_open(directory / name, "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return base, shapes


def default_tokenizer_gguf(vocab: int):
    """The embedded SmolLM2 GGUF file when its tokenizer has `vocab` entries (to copy into an exported GGUF), else
    None."""
    from fxprune.export.gguf import tokenizer_fields
    from fxprune.data.models import embedded_gguf
    try:
        source = embedded_gguf()
        tokenizer_fields(source, vocab)
        return source
    except (FileNotFoundError, ValueError):
        return None  # no embedded model, or another vocabulary: the file gets no tokenizer


def cmd_export(args) -> int:
    """`fxprune export`: write a saved pruned directory as a Hugging Face checkpoint, a GGUF file or a `.pt2`
    program. Returns the exit code."""
    from fxprune.export.common import check_free
    directory, output = Path(args.model), check_free(args.output)
    base, shapes = saved_description(directory)
    tokenizer_gguf = None
    if args.format == "hf":
        from fxprune.export.hf import check_hf_expressible
        check_hf_expressible(base, shapes)
    elif args.format == "gguf":
        from fxprune.export.gguf import check_gguf_expressible
        vocab = shapes.get("model.embed_tokens.weight", (0,))[0]
        tokenizer_gguf = args.tokenizer_gguf or default_tokenizer_gguf(vocab)
        check_gguf_expressible(base["config"], shapes, tokenizer_gguf)
    elif output.suffix != ".pt2":
        raise ValueError(f"--format pt2 writes a .pt2 file; got --output {output}")
    import fxprune
    gm = fxprune.load(directory)
    if args.format == "hf":
        fxprune.export_hf(gm, output, tokenizer=saved_tokenizer(directory))
    elif args.format == "gguf":
        fxprune.export_gguf(gm, output, dtype=args.dtype, tokenizer_gguf=tokenizer_gguf)
    else:
        fxprune.export_program(gm, output, aoti=args.aoti)
    print(f"wrote {output} ({args.format}{', tokenizer from ' + str(tokenizer_gguf) if tokenizer_gguf else ''})")
    return 0


def saved_tokenizer(directory: Path):
    """The tokenizer `fxprune prune` saves beside the weights, if there is one."""
    if not (directory / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)
