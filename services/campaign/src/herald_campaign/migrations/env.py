from herald_campaign.storage import metadata
from herald_common.db import run_alembic_env

run_alembic_env(metadata)
