"""Operations routes: liveness, readiness, Prometheus metrics and an offline API reference
page."""

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import HTMLResponse, Response

from advface.service.errors import error_response, error_responses
from advface.service.routes.deps import NOT_READY, STARTUP_FAILED, Svc
from advface.service.schemas import Health, Ready

# A self-contained page (no CDN, no external script): it lists the operations of /openapi.json.
# Deployments without internet access, and clients that must not fetch third-party code with
# the service's origin, still get readable docs.
DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>advface template service - API</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em}
.op{border:1px solid #ccc;border-radius:4px;margin:.6em 0;padding:.4em .8em}
.m{display:inline-block;min-width:4.5em;font-weight:bold;text-transform:uppercase}
code{background:#f3f3f3;padding:0 .2em}ul{margin:.2em 0}.d{color:#444;white-space:pre-wrap}
</style></head><body>
<h1 id="title">API</h1><p id="info"></p><div id="ops">loading openapi.json ...</div>
<script>
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
fetch("openapi.json").then(r => r.json()).then(spec => {
  document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
  document.getElementById("info").textContent = spec.info.description || "";
  const ops = document.getElementById("ops");
  ops.textContent = "";
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const box = el("div", undefined, "op");
      const head = el("div");
      head.append(el("span", method, "m"), el("code", path), " ", op.summary || "");
      box.append(head);
      if (op.description) box.append(el("div", op.description, "d"));
      const params = (op.parameters || []).map(
        p => p.in + " " + p.name + (p.required ? " (required)" : ""));
      if (op.requestBody) params.push("body: " + Object.keys(op.requestBody.content).join(", "));
      if (params.length) box.append(el("div", "input: " + params.join("; ")));
      const list = el("ul");
      for (const [code, resp] of Object.entries(op.responses || {})) {
        list.append(el("li", code + ": " + (resp.description || "")));
      }
      box.append(list);
      ops.append(box);
    }
  }
}).catch(err => {
  document.getElementById("ops").textContent = "cannot load openapi.json: " + err;
});
</script></body></html>
"""
_DOCS_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)


def router(metrics: bool = False, metrics_token: str = "") -> APIRouter:
    r = APIRouter(tags=["ops"])

    @r.get("/health", response_model=Health, responses=error_responses(500))
    def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @r.get("/ready", response_model=Ready, responses=error_responses(500, 503))
    def ready(svc: Svc) -> Any:
        """Readiness: embeddings complete, index loaded, database answering (503 otherwise).

        Unauthenticated (load balancers probe it), so it says ready or why not and nothing
        else: the start-up figures are in the server log, a tenant's counts in ``/v1/stats``.
        """
        if svc.startup_error:
            # A fixed category: the driver's message (hosts, users, paths) stays in the log.
            return error_response(503, "startup_failed", f"{STARTUP_FAILED} ({svc.startup_error})")
        if not svc.ready.is_set():
            return error_response(503, "not_ready", NOT_READY)
        if not svc.store.ping():
            return error_response(503, "database_unavailable", "the database does not answer")
        return Ready(status="ready")

    if metrics:

        @r.get("/metrics", include_in_schema=False)
        def metrics_text(
            svc: Svc, authorization: Annotated[str | None, Header()] = None
        ) -> Response:
            """Prometheus metrics, aggregate only; with a token, only for its bearer."""
            from advface.service.metrics import CONTENT_TYPE

            if metrics_token and not hmac.compare_digest(
                (authorization or "").encode(), f"Bearer {metrics_token}".encode()
            ):
                return error_response(
                    401, "invalid_metrics_token", "metrics need Authorization: Bearer <token>"
                )
            return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE)

    @r.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_HTML, headers={"Content-Security-Policy": _DOCS_CSP})

    return r
