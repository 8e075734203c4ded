"""Transform values as data: one row per (run, transform, field, step, rank) scalar.

Backfills from the ``step_record.transforms`` JSON of rows stored before (scalar values only;
per-layer lists stay there). Downgrade drops the table (the JSON still holds everything).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 16:20:00
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def upgrade() -> None:
    op.create_table('transform_value',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('transform', sa.String(length=128), nullable=False),
    sa.Column('field', sa.String(length=128), nullable=False),
    sa.Column('step', sa.BigInteger(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('value', sa.Double(), nullable=True),
    sa.Column('is_nan', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_transform_value_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'transform', 'field', 'step', 'rank', name=op.f('pk_transform_value')),
    sqlite_with_rowid=False
    )
    _backfill()


def _backfill() -> None:
    conn = op.get_bind()
    table = sa.table('transform_value', *(sa.column(c) for c in ('run_id', 'transform', 'field', 'step', 'rank',
                                                                  'value', 'is_nan')))
    res = conn.execute(sa.text("SELECT run_id, step, rank, transforms FROM step_record "
                               "WHERE transforms IS NOT NULL")).fetchall()
    rows: list[dict[str, Any]] = []
    for run_id, step, rank, tr in res:
        if isinstance(tr, str):
            tr = json.loads(tr)
        for name, vals in (tr or {}).items():
            for field, v in (vals or {}).items():
                v = _SPECIAL.get(v, v) if isinstance(v, str) else v
                if type(v) in (int, float) and not isinstance(v, bool):
                    nan = v != v
                    rows.append({"run_id": run_id, "transform": name[:128], "field": field[:128], "step": step,
                                 "rank": rank, "value": None if nan else float(v), "is_nan": nan})
        if len(rows) >= 5000:
            conn.execute(sa.insert(table), rows)
            rows = []
    if rows:
        conn.execute(sa.insert(table), rows)


def downgrade() -> None:
    op.drop_table('transform_value')
