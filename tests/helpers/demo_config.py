"""Load a demo config whose data root comes from environment variables."""
import os

# The data-root variables of the demo configs.
DATA_VARS = ('SHAPES_CLS_ROOT', 'SHAPES_ROOT')


def demo_config(path: str, env: dict):
    """``Config.fromfile(path)`` with the demo data-root variables of
    ``env`` set while it is read (the config substitutes them then); the
    process environment is restored afterwards."""
    from mmengine.config import Config
    saved = {v: os.environ.get(v) for v in DATA_VARS}
    os.environ.update({v: env[v] for v in DATA_VARS if v in env})
    try:
        return Config.fromfile(path)
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
