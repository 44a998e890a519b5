"""Import an authors' released checkpoint (VSRN/AOQ, BFAN/AOQ layout) as a checkpoint of this pipeline.

Input:  a reference `model_best.pth.tar` (a dict with a list of state dicts and a pickled Python-2
        argparse namespace, legacy serialization), read weights-only: no object other than
        tensors, containers and the namespace's plain values is ever unpickled.
Output: a pipeline checkpoint (`torch.load(weights_only=True)`) that `evaluate` scores like any
        trained model. The model config is read off the weights and the reference options.
The prepared vocabulary must be the one the checkpoint was trained with (config dataset.vocab_pkl
or vocab_json); the step checks that the sizes agree.

Example:
    python -m pipeline_steps.import_checkpoint --reference runs/aoq_f30k_1/model_best.pth.tar \
        --arch vsrn --prepared results/f30k_precomp/prepared --out released/vsrn_aoq_1.pt
"""

import argparse
import json
import logging
import sys

from models import create_model
from models.registry import model_class
from pipeline_steps.common.atomic import remove_stale_temporaries
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.data.reference_files import load_reference_checkpoint
from pipeline_steps.data.splits import read_manifest
from pipeline_steps.training.checkpoint import save_checkpoint

log = logging.getLogger("import_checkpoint")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, help="the released checkpoint")
    p.add_argument("--arch", required=True, help="registered model that reads this layout (vsrn, bfan)")
    p.add_argument("--prepared", required=True, help="prepared folder (its vocabulary must match)")
    p.add_argument("--model-config", default="{}", help="JSON: config fields to override")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    remove_stale_temporaries(args.out)
    reference = load_reference_checkpoint(args.reference)  # its refusals name the file already
    try:
        cls = model_class(args.arch)
        if not hasattr(cls, "load_reference_state"):
            raise ValueError(f"model {args.arch!r} cannot read the reference checkpoint layout")
        config = cls.config_from_reference(reference["opt"], reference["model"]).__dict__
        config |= json.loads(args.model_config)
        vocab_size = read_manifest(args.prepared)["vocab_size"]
        if config["vocab_size"] != vocab_size:
            raise ValueError(
                f"the checkpoint has a vocabulary of {config['vocab_size']} words, the "
                f"prepared data {vocab_size}: prepare the data with the released vocabulary"
            )
        model = create_model(args.arch, **config)
        model.load_reference_state(reference["model"])
    except (ValueError, KeyError) as err:
        raise SystemExit(f"error: {args.reference}: {err}") from None
    save_checkpoint(
        args.out,
        model,
        epoch=reference["epoch"],
        iteration=reference["eiters"],
        val_score4=reference["best_rsum"],
        seed=None,
        source=str(args.reference),
        loss_config=json.dumps({"variant": "released"}),
        train_config="{}",
    )
    log.info("imported %s (%s, epoch %s) -> %s", args.reference, args.arch, reference["epoch"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
