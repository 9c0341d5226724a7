import sys

from .resident import nbragg

sys.exit(nbragg())
