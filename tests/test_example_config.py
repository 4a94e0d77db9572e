"""etc/ccsmtp.toml documents every key, and uncommented it is a valid configuration."""

import pathlib
import re

from prefork_smtp import config

EXAMPLE = pathlib.Path(__file__).parent.parent / "etc" / "ccsmtp.toml"
SETTING = re.compile(r'# ((\w+|"[^"]+") = .*|\[aliases\])$')


def uncommented_example() -> str:
    lines = EXAMPLE.read_text().splitlines()
    return "\n".join(line[2:] for line in lines if SETTING.match(line))


def test_example_mentions_every_key():
    text = uncommented_example()
    for key in config.KEYS:
        assert re.search(rf"^{key} = |^\[{key}\]", text, re.M), f"etc/ccsmtp.toml lacks {key}"


def test_example_uncommented_is_valid(tmp_path):
    path = tmp_path / "ccsmtp.toml"
    path.write_text(uncommented_example())
    cfg = config.build({}, str(path))
    assert cfg.aliases["root"] == "alice"
    assert cfg.domains == frozenset({"example.org", "localhost"})
    assert cfg.max_size_bytes == 26214400
