"""``advface client ...``: talk to a running template service (E runs here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from advface.cli._errors import user_errors
from advface.cli._server import print_json

client_app = typer.Typer(help="Talk to a running template service.", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:8000"  # advface serve's default host and port
UrlOpt = Annotated[str, typer.Option(envvar="ADVFACE_URL", help="service base URL")]
KeyOpt = Annotated[str, typer.Option(envvar="ADVFACE_API_KEY", help="tenant API key")]
AlignedOpt = Annotated[bool, typer.Option(help="images are already 160x160 aligned crops")]
NoFaceOpt = Annotated[
    bool,
    typer.Option(
        "--allow-no-face",
        help="send images in which MTCNN finds no face (centre crop) instead of refusing them",
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        envvar="ADVFACE_BACKEND", help="client E: facenet | toy (tests); match the server"
    ),
]


ExtractorOpt = Annotated[
    Path | None,
    typer.Option(
        envvar="ADVFACE_EXTRACTOR",
        help="run E from this exported folder (advface export-extractor) with OpenCV "
        "instead of torch",
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(client_app, name="client")
    app.command("export-extractor")(export_extractor_cmd)


def _client(
    url: str, api_key: str, backend: str = "facenet", extractor_dir: Path | None = None
) -> Any:
    from advface.service.sdk import AdvFaceClient

    if not api_key:
        raise ValueError(
            "no API key: pass --api-key or set ADVFACE_API_KEY (advface keys create TENANT "
            "prints one)"
        )
    if extractor_dir is not None and backend != "facenet":
        raise ValueError("--extractor and --backend both choose E: give one")
    version = None
    if extractor_dir is not None:
        from advface.service.extractor_onnx import OnnxExtractor

        extractor = OnnxExtractor(extractor_dir)  # it carries its model version
    elif backend != "facenet":
        from advface.service.backend import load_backend

        net = load_backend(backend)
        extractor, version = net.extractor, net.version
    else:
        extractor = None  # the SDK loads FaceNet's E on first use
    return AdvFaceClient(url, api_key, extractor=extractor, model_version=version)


def export_extractor_cmd(
    out: Annotated[Path, typer.Option(help="folder to write (extractor.onnx + config.json)")],
    backend: BackendOpt = "facenet",
    overwrite: Annotated[
        bool, typer.Option(help="replace OUT if it is an earlier export (nothing else)")
    ] = False,
) -> None:
    """Export the client's E to ONNX for devices without PyTorch (advface client --extractor
    OUT, or OnnxExtractor(OUT) in the SDK: OpenCV runs it)."""
    from advface.service.backend import load_backend
    from advface.service.extractor_onnx import export_extractor

    with user_errors():
        if out.exists() and not overwrite:  # before loading the networks
            raise FileExistsError(f"{out} exists (--overwrite replaces an earlier export)")
        net = load_backend(backend)
        config = export_extractor(
            net.extractor, out, model_version=net.version, overwrite=overwrite
        )
    print_json({"out": str(out), **config})


def _with_client(
    url: str,
    api_key: str,
    action: Callable[[Any], Any],
    backend: str = "facenet",
    extractor_dir: Path | None = None,
) -> Any:
    """``action(client)``'s result; an error the service answers (or not reaching it) is
    ``error: ...`` and exit 1, bad input (an image, a file, a URL, the key) exit 2."""
    from advface.service.sdk import AdvFaceServiceError

    try:
        with _client(url, api_key, backend, extractor_dir) as c:
            return action(c)
    except AdvFaceServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except (ValueError, FileNotFoundError) as exc:  # bad image, missing file, ...
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@client_app.command("enroll")
def client_enroll(
    subject: str,
    images: Annotated[list[Path], typer.Argument(help="face images")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
    create: Annotated[bool, typer.Option(help="create the subject if missing")] = True,
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
    extractor: ExtractorOpt = None,
) -> None:
    """Align, extract E(x) here, and enroll each image for SUBJECT (one JSON line each)."""

    def enroll(c: Any) -> None:
        # Every image is checked (readable, has a face) before anything is sent.
        feats = [c.features(i, aligned=aligned, allow_no_face=allow_no_face) for i in images]
        if create:
            c.create_subject(subject, exist_ok=True)
        for z in feats:
            print_json(c.enroll(subject, z))

    _with_client(url, api_key, enroll, backend, extractor)


@client_app.command("enroll-folder")
def client_enroll_folder(
    folder: Annotated[Path, typer.Argument(help="<folder>/<subject>/<image> tree")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
    extractor: ExtractorOpt = None,
) -> None:
    """Enroll a whole gallery, one subject per folder (created as needed); rerun to resume:
    images already stored are skipped. Prints a JSON summary with the images skipped."""
    from tqdm import tqdm

    def enroll(c: Any) -> dict[str, Any]:
        with tqdm(unit="image", desc="enroll-folder") as bar:

            def start(total: int) -> None:
                bar.total = total
                bar.refresh()

            def step(key: str, outcome: str) -> None:
                bar.update(1)
                bar.set_postfix_str(outcome)

            return c.enroll_folder(
                folder,
                aligned=aligned,
                allow_no_face=allow_no_face,
                on_image=step,
                on_start=start,
            )

    print_json(_with_client(url, api_key, enroll, backend, extractor))


@client_app.command("verify")
def client_verify(
    subject: str,
    image: Path,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
    extractor: ExtractorOpt = None,
) -> None:
    """1:1: is IMAGE the enrolled SUBJECT? Exit code 0 for a match, 3 for no match."""
    result = _with_client(
        url,
        api_key,
        lambda c: c.verify(subject, image, aligned=aligned, allow_no_face=allow_no_face),
        backend,
        extractor,
    )
    print_json(result)
    if not result.match:
        raise typer.Exit(3)


@client_app.command("identify")
def client_identify(
    image: Path,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = "",
    top_k: Annotated[int, typer.Option(min=1, help="candidates to return")] = 5,
    aligned: AlignedOpt = False,
    backend: BackendOpt = "facenet",
    allow_no_face: NoFaceOpt = False,
    extractor: ExtractorOpt = None,
) -> None:
    """1:N: the TOP_K most similar enrolled subjects."""
    found = _with_client(
        url,
        api_key,
        lambda c: c.identify(image, top_k, aligned=aligned, allow_no_face=allow_no_face),
        backend,
        extractor,
    )
    print_json([vars(x) for x in found])


@client_app.command("subjects")
def client_subjects(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "") -> None:
    """List the tenant's subjects (one JSON line each)."""

    def print_all(c: Any) -> None:
        for s in c.list_subjects():  # printed as the pages arrive
            print_json(s)

    _with_client(url, api_key, print_all)


@client_app.command("delete-subject")
def client_delete_subject(subject: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "") -> None:
    """Delete SUBJECT and its templates."""
    n = _with_client(url, api_key, lambda c: c.delete_subject(subject))
    print_json({"subject_id": subject, "deleted_templates": n})


@client_app.command("template")
def client_template(template_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "") -> None:
    """Show a template's record: subject, protection and its parameters, model version."""
    print_json(_with_client(url, api_key, lambda c: c.get_template(template_id)))


@client_app.command("delete-template")
def client_delete_template(
    template_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = ""
) -> None:
    """Delete one template (the subject and its other templates stay)."""
    _with_client(url, api_key, lambda c: c.delete_template(template_id))
    print_json({"template_id": template_id, "deleted": True})


@client_app.command("stats")
def client_stats(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = "") -> None:
    """The tenant's stored templates per protection and per model version (JSON)."""
    print_json(_with_client(url, api_key, lambda c: c.stats()))
