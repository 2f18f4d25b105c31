"""``python -m dino.train --config-file F --output-dir D [--no-resume] [key=value ...]``."""
import sys

from dino.configs.config import ConfigError
from dino.data.unreadable import TooManyUnreadableSamples
from dino.train.train import NonFiniteLossError, main
from dino.utils.checkpoint import NonFiniteStateError
from dino.utils.run_lock import RunLockError

# A user error, a busy output dir, a diverged run or broken data: the message says what and where;
# a traceback adds nothing.
CLEAN_EXITS = (ConfigError, NonFiniteLossError, NonFiniteStateError, RunLockError, TooManyUnreadableSamples)

if __name__ == "__main__":
    try:
        main()
    except CLEAN_EXITS as e:
        sys.exit(f"error: {e}")
