from herald_common.db import run_alembic_env
from herald_scheduler.storage import metadata

run_alembic_env(metadata)
