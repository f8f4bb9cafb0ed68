"""Runs a whole multi-stage recipe, each stage in its own workdir under --workdir; resumes.

    python scripts/run_recipe.py real_to_binary --workdir workdirs/real_to_binary
    python scripts/run_recipe.py digits_kd --workdir /tmp/digits-kd --set train.epochs=5

--set a.b=value overrides a field in every stage's config, --set step1:a.b=value in one stage
only (repeatable). Prints each stage's
final top-1 at the end and, with --json, one JSON object {stage: metrics} as the last line.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnn_jax import cli  # noqa: E402
from bnn_jax.recipes import RECIPES, run_recipe  # noqa: E402
from bnn_jax.train import USER_ERRORS  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("recipe", choices=sorted(RECIPES))
  parser.add_argument("--workdir", required=True, help="parent workdir; one sub-directory per stage")
  parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE",
                      help="override a config field in every stage (STAGE:A.B=VALUE: in one)")
  parser.add_argument("--json", action="store_true", help="print {stage: metrics} as JSON last")
  args = parser.parse_args()
  results = run_recipe(args.recipe, args.workdir, args.set)
  for stage, metrics in results.items():
    print(f"{args.recipe} {stage}: eval top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%} "
          f"on {metrics['num_examples']} images")
  if args.json:
    print(json.dumps(results))


if __name__ == "__main__":
  cli.script(main, errors=USER_ERRORS)
