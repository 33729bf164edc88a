"""``refresher_spread`` must leave a new response some time before it is due again.

The refresher claims a row up to the spread before its renewal point, which comes
``response_validity - refresh_margin - this_update_backdate`` after the row was signed.
With 8 h responses renewed 4 h ahead and a 3.5 h spread, a response signed a second ago
was due again: every pass re-signed it ("re-signed 1 ... still due: 1"), and a pass with a
batch of such rows never ended. Such a configuration is refused with one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from responder.config import ConfigError, load_config
from tests.support import run_cli


def test_spread_that_makes_fresh_responses_due_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text(
        'response_validity = "8h"\nrefresh_margin = "4h"\nrefresher_spread = "3h30m"\n'
    )
    result = run_cli(config, "refresh")
    assert result.returncode == 1
    assert result.stderr.startswith("ocsp-responder: error: refresher_spread: must be at most")
    assert "3h / 2" in result.stderr and "Traceback" not in result.stderr
    # at most half of 8h - 4h - 1h is fine; the defaults (4d, 2d, 1h spread) too
    config.write_text('response_validity = "8h"\nrefresh_margin = "4h"\nrefresher_spread = "90m"\n')
    assert load_config(config, {}).refresher_spread.total_seconds() == 5400
    config.write_text("")
    load_config(config, {})
    config.write_text('response_validity = "8h"\nrefresh_margin = "4h"\nrefresher_spread = "91m"\n')
    with pytest.raises(ConfigError, match="refresher_spread"):
        load_config(config, {})
