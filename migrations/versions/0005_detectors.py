"""Detectors and alerts: event source/severity/layers/message, project rules, per-run detector
state, the alert outbox and its delivery attempts.

Existing events are the agent's (``source`` defaults to ``agent``). Downgrade drops the new
tables and columns (detector events are dropped with them: they are re-creatable by replay).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 22:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=16), server_default='agent', nullable=False))
        batch_op.add_column(sa.Column('severity', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('layers', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('message', sa.Text(), nullable=True))
    op.create_table('project_rules',
    sa.Column('project', sa.String(length=512), nullable=False),
    sa.Column('rules', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('project', name=op.f('pk_project_rules'))
    )
    op.create_table('detector_state',
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Text(), nullable=False),
    sa.Column('last_step', sa.BigInteger(), nullable=True),
    sa.Column('updated_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_detector_state_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', name=op.f('pk_detector_state'))
    )
    op.create_table('alert_outbox',
    sa.Column('id', _BIGINT_PK, autoincrement=True, nullable=False),
    sa.Column('project', sa.String(length=512), nullable=False),
    sa.Column('run_id', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.BigInteger(), nullable=True),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.Double(), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('delivered_at', sa.Double(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['run.id'], name=op.f('fk_alert_outbox_run_id_run'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_outbox'))
    )
    with op.batch_alter_table('alert_outbox', schema=None) as batch_op:
        batch_op.create_index('ix_alert_outbox_status_next', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_alert_outbox_project_id', ['project', 'id'], unique=False)
    op.create_table('alert_attempt',
    sa.Column('id', _BIGINT_PK, autoincrement=True, nullable=False),
    sa.Column('outbox_id', sa.BigInteger(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('time', sa.Double(), nullable=False),
    sa.Column('duration', sa.Double(), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['outbox_id'], ['alert_outbox.id'], name=op.f('fk_alert_attempt_outbox_id_alert_outbox'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alert_attempt'))
    )
    with op.batch_alter_table('alert_attempt', schema=None) as batch_op:
        batch_op.create_index('ix_alert_attempt_outbox_id', ['outbox_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('alert_attempt', schema=None) as batch_op:
        batch_op.drop_index('ix_alert_attempt_outbox_id')
    op.drop_table('alert_attempt')
    with op.batch_alter_table('alert_outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_alert_outbox_project_id')
        batch_op.drop_index('ix_alert_outbox_status_next')
    op.drop_table('alert_outbox')
    op.drop_table('detector_state')
    op.drop_table('project_rules')
    op.execute("DELETE FROM event WHERE source = 'detector'")
    with op.batch_alter_table('event', schema=None) as batch_op:
        batch_op.drop_column('message')
        batch_op.drop_column('layers')
        batch_op.drop_column('severity')
        batch_op.drop_column('source')
