"""``d2nwg adapters convert-bone``: legacy Bone adapter folders to MiSS."""

from __future__ import annotations

import argparse

from d2nwg.commands.options import FORMATTER, warn


# ----------------------------------------------------------------------------- adapters
def cmd_adapters_convert_bone(args: argparse.Namespace) -> None:
    from d2nwg.targets.adapters.legacy_bone import convert_bone_folder

    out, dropped = convert_bone_folder(args.input, args.output)
    if dropped:
        warn(f"config keys MiSS does not know were left out: {', '.join(dropped)}")
    print(f"MiSS adapter folder: {out} (PeftModel.from_pretrained(base, '{out}'))")


def add_adapters_parser(sub) -> None:
    adapters = sub.add_parser("adapters", help="work with PEFT adapter folders", formatter_class=FORMATTER)
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    bone = adapters_sub.add_parser(
        "convert-bone", formatter_class=FORMATTER,
        help="convert a legacy Bone adapter folder (peft < 0.19, peft_type BONE, bone_block tensors) to MiSS",
    )
    bone.add_argument("input", help="Bone adapter folder (adapter_config.json + adapter_model.safetensors or .bin)")
    bone.add_argument("output", help="new MiSS adapter folder (must not exist or be empty)")
    bone.set_defaults(func=cmd_adapters_convert_bone)
