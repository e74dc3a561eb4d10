"""HTTP routes: thin translations of requests into `review`, `edits`, `storage` and
`exports` calls, one module per area (accounts, cases, fields, images, cells, model
sets, exports; `site`: health and static files).

Three kinds of router: `public` (login, health, static files: the only routes without
a session), `pages` (server-rendered HTML) and `api` (JSON for the review page's
script). Every route of `pages` and `api` requires a session, and a CSRF token on
anything but GET (`common`); an account with a temporary password reaches only the
password change (`auth.PASSWORD_CHANGE_PATHS`) until it picks its own.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from leukodiff.server.routes import (
    accounts,
    cases,
    cells,
    exports,
    fields,
    images,
    model_sets,
    site,
)

#: Every route, in the order the app matches them: public, then pages, then the API.
ROUTES: tuple[BaseRoute, ...] = (
    *site.public.routes, *accounts.public.routes,
    *accounts.pages.routes, *model_sets.pages.routes, *cases.pages.routes,
    *accounts.api.routes, *model_sets.api.routes, *cases.api.routes, *fields.api.routes,
    *images.api.routes, *cells.api.routes, *exports.api.routes,
)
