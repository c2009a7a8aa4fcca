"""Converts pytorch-fid's Inception weights (.pth) to an .npz that loads without torch.

    python -m adm_jax.evaluation.convert_inception \\
        --pth pt_inception-2015-12-05-6726825d.pth \\
        --out ~/.cache/adm_jax/pt_inception-2015-12-05.npz

Needs torch once. Verifies the .pth's SHA-256 (the official release unless --inception_sha256
says otherwise) and records it in the .npz, which ``load_inception_variables`` checks.
"""

from __future__ import annotations

import argparse

import numpy as np
from etils import epath

from adm_jax import paths
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pth", required=True, help=f"pytorch-fid {inception.WEIGHTS_FILENAME}")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument(
        "--inception_sha256",
        default=inception.WEIGHTS_SHA256,
        help="expected SHA-256 of the .pth ('none' skips the check)",
    )
    args = parser.parse_args(argv)
    sha = None if args.inception_sha256.lower() == "none" else args.inception_sha256
    print(f"wrote {convert(args.pth, args.out, sha)}")


if __name__ == "__main__":
    main()
