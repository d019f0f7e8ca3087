"""The baseline of the webhook benchmark: the bare framework (FastAPI on uvicorn, same settings) answering 200."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/webhooks/standard")
async def standard() -> Response:
    return Response(b'{"status":"accepted"}', media_type="application/json")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    config = uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False, server_header=False)
    uvicorn.Server(config).run()
