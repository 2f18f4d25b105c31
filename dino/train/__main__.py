"""``python -m dino.train --config-file F --output-dir D [--no-resume] [key=value ...]``."""
import sys

from dino.configs.config import ConfigError
from dino.train.train import NonFiniteLossError, main

if __name__ == "__main__":
    try:
        main()
    except (ConfigError, NonFiniteLossError) as e:
        # A user error or a diverged run: the message says what and where; a traceback adds nothing.
        sys.exit(f"error: {e}")
