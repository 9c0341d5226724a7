import sys

from .resident import run_command

sys.exit(run_command("nbragg"))
