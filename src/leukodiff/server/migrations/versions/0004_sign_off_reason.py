"""cases record why a reviewer signed off short of the mark, and amendments

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 20:15:00

`cases.sign_off_reason` is the reason a reviewer gave for signing off a case below its
target count, with white cells nobody reviewed, or with fields whose analysis failed
(issue #16, safe sign-off). NULL: no reason was needed (or the case was signed before
this revision). It goes into the audit trail, the case page and the FHIR conclusion.
`cases.amendments` counts how often a signed case was reopened to amend it (its next
sign-off issues a FHIR report with status `amended`) and `cases.amend_reason` holds the
latest reopening's reason.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sign_off_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('amendments', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('amend_reason', sa.Text(), nullable=True))


def downgrade() -> None:
    # In place, not batch mode (see 0002: a batch copy breaks the foreign keys).
    op.drop_column('cases', 'amend_reason')
    op.drop_column('cases', 'amendments')
    op.drop_column('cases', 'sign_off_reason')
