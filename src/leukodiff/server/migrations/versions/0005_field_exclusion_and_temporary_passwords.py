"""fields can be excluded from the differential; temporary passwords; last sign-in

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 10:00:00

`fields.excluded` takes a field out of the case's differential, counts and exports
(issue #16, field management): a blurred, mislabelled or wrong-slide image. Its cells and
its stored file stay (nothing a user gave is lost); `exclude_reason`, `excluded_at` and
`excluded_by` say why, when and by whom (the audit trail keeps every exclusion and
inclusion). `users.must_change_password` is set for an account whose password an admin
chose (created or reset): its next sign-in must choose a new one before anything else.
`users.last_login_at` is shown on the accounts page (NULL: never, or before this revision).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE ADD COLUMN, not batch mode: on SQLite a batch with an expression
    # default (false()) copies the table, and dropping the old `users` or `fields` breaks
    # the foreign keys that cases, fields and cells hold on them (see 0002).
    op.add_column('fields', sa.Column('excluded', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    op.add_column('fields', sa.Column('exclude_reason', sa.Text(), nullable=True))
    op.add_column('fields', sa.Column('excluded_at', sa.DateTime(timezone=True),
                                      nullable=True))
    # A username, not a foreign key: SQLite cannot add a foreign key without copying the
    # table (above). Accounts are never renamed or deleted; the audit event holds the id.
    op.add_column('fields', sa.Column('excluded_by', sa.String(64), nullable=True))
    op.add_column('users', sa.Column('must_change_password', sa.Boolean(), nullable=False,
                                     server_default=sa.false()))
    op.add_column('users', sa.Column('last_login_at', sa.DateTime(timezone=True),
                                     nullable=True))


def downgrade() -> None:
    # In place, not batch mode (see 0002: a batch copy breaks the foreign keys).
    op.drop_column('users', 'last_login_at')
    op.drop_column('users', 'must_change_password')
    op.drop_column('fields', 'excluded_by')
    op.drop_column('fields', 'excluded_at')
    op.drop_column('fields', 'exclude_reason')
    op.drop_column('fields', 'excluded')
