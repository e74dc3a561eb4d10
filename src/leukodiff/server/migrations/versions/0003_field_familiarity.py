"""fields record how far they look from the models' training labs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 12:45:00

`fields.familiarity` is the field's distance to the labs the models learnt from
(`pipeline.familiarity`; NULL: not measured, e.g. analysed before this revision or by
models without a reference) and `fields.unlike_training` whether it passed the
reference's threshold: the case page and the FHIR conclusion then say "images unlike
the training labs: review every cell".
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN, not batch mode: on SQLite a batch with an expression
    # default (false()) copies the table, and dropping the old `fields` fails ("FOREIGN KEY
    # constraint failed") once `cells` holds foreign keys on it (see 0002 and 0005). The
    # resulting columns are the same as the batch copy's.
    op.add_column('fields', sa.Column('familiarity', sa.Float(), nullable=True))
    op.add_column('fields', sa.Column('unlike_training', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    # In place, not batch mode (see 0002: a batch copy breaks the cells' foreign keys).
    op.drop_column('fields', 'unlike_training')
    op.drop_column('fields', 'familiarity')
