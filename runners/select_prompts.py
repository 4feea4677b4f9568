"""Write the ids of the k most memorization-prone prompts of a finished detection job, for `prompts.select_ids`.

    python -m runners.select_prompts outputs/detect/.../generations.csv --k 300 --out prone300.txt
"""
import argparse
from pathlib import Path

from benchmark.detectors.detection import prone_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generations_csv")
    parser.add_argument("--k", type=int, default=300)
    parser.add_argument("--detector", default="D")
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--layers", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ids = prone_ids(args.generations_csv, args.k, args.detector, args.T, args.layers)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; not overwriting it")
    out.write_text("\n".join(ids) + "\n")
    print(f"{len(ids)} ids -> {out}")


if __name__ == "__main__":
    main()
