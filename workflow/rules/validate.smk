# The configuration is checked before anything is planned: first against the schema (which also
# fills in its defaults), then by workflow/config_checks.py (strict numbers, unique names, the
# rules that span several keys). A refusal is one line naming the key (`config: <key>: <problem>`),
# printed without a traceback.
import sys
from pathlib import Path

sys.path[:0] = [workflow.basedir, str(Path(workflow.basedir).parent)]
import config_checks as checks
from models.variants import VARIANTS

# The loss variants in the paper's order (models/variants.py, the one list of them).
LOSS_VARIANTS = list(VARIANTS)

try:
    checks.validated(config, Path(workflow.basedir) / "schemas" / "config.schema.yaml", LOSS_VARIANTS)
except checks.ConfigError as refusal:
    sys.exit(str(refusal))
