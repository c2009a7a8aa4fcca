"""Converts pytorch-fid's Inception weights (.pth) to an .npz that loads without torch.

    python -m adm_jax.evaluation.convert_inception \\
        --pth pt_inception-2015-12-05-6726825d.pth \\
        --out ~/.cache/adm_jax/pt_inception-2015-12-05.npz

Needs torch once. Verifies the .pth's SHA-256 (the official release unless --inception_sha256
says otherwise) and records it in the .npz, which ``load_inception_variables`` checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import app, flags
from etils import epath

from adm_jax import cli_flags, paths
from adm_jax.evaluation import inception


def convert(pth, out, sha256: str | None = inception.WEIGHTS_SHA256) -> epath.Path:
    """Writes the .npz (paths local or gs://); returns its path."""
    if not paths.path(pth).exists():
        raise inception._missing_weights_error([pth])
    got = inception.file_sha256(pth)
    if sha256 is not None and got != sha256.lower():
        raise ValueError(f"{pth}: SHA-256 {got} != expected {sha256} ({inception.WEIGHTS_URL})")
    state_dict = inception.load_torch_state_dict(pth)
    inception.variables_from_state_dict(state_dict)  # structure check before writing
    out = paths.path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with paths.open_atomic(out) as f:
        np.savez(f, **state_dict, **{inception.SOURCE_SHA256_KEY: np.array(got)})
    return out


USAGE = (
    "python -m adm_jax.evaluation.convert_inception --pth FILE.pth --out FILE.npz "
    "[--inception_sha256 HEX|none]"
)


def _flag_values() -> flags.FlagValues:
    """The command's flags, on a ``FlagValues`` of their own (see ``adm_jax.cli_flags``)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("pth", None, f"pytorch-fid {inception.WEIGHTS_FILENAME}", flag_values=fv)
    flags.DEFINE_string("out", None, "output .npz (local or gs://)", flag_values=fv)
    flags.DEFINE_string(
        "inception_sha256",
        inception.WEIGHTS_SHA256,
        "expected SHA-256 of the .pth ('none' skips the check)",
        flag_values=fv,
    )
    return fv


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m adm_jax.evaluation.convert_inception ARGS`` as a function (``argv`` without
    the program name; None: ``sys.argv[1:]``); returns the written .npz."""
    fv = _flag_values()
    extra = cli_flags.parse(fv, argv, usage=USAGE, required=["pth", "out"])
    if extra:
        raise app.UsageError(f"unexpected arguments {extra} (flags are --name=value)")
    sha = fv.inception_sha256
    out = convert(fv.pth, fv.out, None if sha.lower() == "none" else sha)
    print(f"wrote {out}")
    return str(out)


if __name__ == "__main__":
    cli_flags.run(main)
