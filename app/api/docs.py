"""API docs served without a CDN (air-gapped clusters): Swagger UI and ReDoc assets come from
the fastapi-offline package's static files, mounted under /static/docs."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS = "/static/docs"
SWAGGER = "/docs"
REDOC = "/redoc"
# Every path the docs pages and their assets are served under (they need scripts and styles).
PATHS = (SWAGGER, REDOC, ASSETS)


def install(app: FastAPI, title: str) -> None:
    directory = str(files("fastapi_offline") / "static")
    app.mount(ASSETS, StaticFiles(directory=directory), name="docs-assets")

    # Behind a root path (ROOT_PATH) the browser must ask for the document and the assets
    # under it, as it reached the page.
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
        )

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route(SWAGGER, swagger, include_in_schema=False)
    app.add_route(REDOC, redoc, include_in_schema=False)
