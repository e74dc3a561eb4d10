"""model sets: the station's registry of analysis models, adapt jobs, the set each field used

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 10:00:00

`model_sets` lists the sets of models the station can analyse with (issue #15, "in the
station"): "shipped" (the package's weights; added by the app at start, not here, since
its hashes are the installed package's) and sets adapted from the station's signed cases,
whose files live in DATA_DIR/models/<name>/. One is the default for new analyses.
`model_jobs` keeps each "adapt from signed cases" job with its progress and outcome.
`fields.model_set` / `model_set_sha256` name the set (and its digest) whose calls a field's
cells carry; NULL for fields analysed before this revision (the shipped models then).
`fields.pending_model_set` is the set a queued re-analysis asked for.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'model_sets',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('name', sa.String(64), nullable=False, unique=True),
        sa.Column('source', sa.String(16), nullable=False),
        sa.Column('base', sa.String(64), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('created_by_id', sa.Integer(), sa.ForeignKey('users.id'), nullable=True),
        sa.Column('sha256', sa.String(64), nullable=False),
        sa.Column('files', sa.JSON(), nullable=False),
        sa.Column('figures', sa.JSON(), nullable=False),
        sa.Column('is_default', sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column('retired', sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        'model_jobs',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('started_by_id', sa.Integer(), sa.ForeignKey('users.id'), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('base', sa.String(64), nullable=False),
        sa.Column('stage', sa.String(200), nullable=True),
        sa.Column('log', sa.JSON(), nullable=False),
        sa.Column('message', sa.Text(), nullable=True),
        sa.Column('model_set', sa.String(64), nullable=True),
        sa.Column('result', sa.JSON(), nullable=True),
    )
    # Plain ADD COLUMN, not batch mode (see 0002 and 0005: a batch copy of `fields` breaks
    # the foreign keys cells hold on it).
    op.add_column('fields', sa.Column('model_set', sa.String(64), nullable=True))
    op.add_column('fields', sa.Column('model_set_sha256', sa.String(64), nullable=True))
    op.add_column('fields', sa.Column('pending_model_set', sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column('fields', 'pending_model_set')
    op.drop_column('fields', 'model_set_sha256')
    op.drop_column('fields', 'model_set')
    op.drop_table('model_jobs')
    op.drop_table('model_sets')
