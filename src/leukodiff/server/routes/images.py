"""Images the pages show: a field's view (full size, or scaled for the navigator) and
a cell's crop; both cached by the browser (they never change for an id)."""

from __future__ import annotations

import io
from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import Response
from PIL import Image as PILImage

from leukodiff.reports.outputs import cell_thumbnail
from leukodiff.server.db import CellRecord, FieldImage
from leukodiff.server.review import ReviewError
from leukodiff.server.routes.common import Id, api_router, found
from leukodiff.server.state import state_of

api = api_router()

IMAGE_CACHE = "private, max-age=86400"  # field views and crops never change for an id
THUMBNAIL = 128
CROP_MAX = 384  # the hover enlargement's crops


@api.get("/fields/{field_id}/image")
def field_image(request: Request, field_id: Id,
                max_side: Annotated[int | None, Query(ge=64, le=4096)] = None) -> Response:
    """The field as a JPEG, full size (the field viewer's deep zoom); `max_side`: scaled
    down to fit that many pixels (the field navigator's thumbnails of large fields)."""
    state = state_of(request)
    with state.db.reading() as session:
        sha256 = found(session, FieldImage, field_id, "field").image_sha256
    path = state.views.view_path(sha256)
    content = path.read_bytes()
    if max_side is not None:
        with PILImage.open(path) as image:
            if max(image.size) > max_side:
                image.thumbnail((max_side, max_side))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=85)
                content = buffer.getvalue()
    return Response(content, media_type="image/jpeg", headers={"Cache-Control": IMAGE_CACHE})


@api.get("/cells/{cell_id}/crop")
def cell_crop(request: Request, cell_id: Id,
              size: Annotated[int, Query(ge=32, le=CROP_MAX)] = THUMBNAIL) -> Response:
    """The cell's crop, `size` pixels square (the page's hover enlargement asks for more)."""
    state = state_of(request)
    with state.db.reading() as session:
        cell = found(session, CellRecord, cell_id, "cell")
        if cell.deleted:  # a false detection, removed: gone from every view of the case
            raise ReviewError(f"no cell {cell_id}", status=404)
        box, sha256 = cell.box, cell.field.image_sha256
    with PILImage.open(state.views.view_path(sha256)) as image:
        crop = cell_thumbnail(image, box, size, margin=1.4)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=88)
    return Response(buffer.getvalue(), media_type="image/jpeg",
                    headers={"Cache-Control": IMAGE_CACHE})
