"""Every rank refuses the run, rank 0 last (it is slower to reach the check, as a rank loading more data is): the
refusal's `error:` line must still reach the console before the launcher stops the ranks."""

import os
import time

from framework.config import run_main
from framework.errors import ConfigError


def main() -> None:
    if os.environ.get("RANK", "0") == "0":
        time.sleep(2)
    raise ConfigError("data.batch_size 0 must be positive: set it to 1 or more.")


if __name__ == "__main__":
    run_main(main)
