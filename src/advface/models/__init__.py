"""advface.models: FaceNet backbone, its client/server split, reconstruction networks."""

from advface.models.facenet import InceptionResnetV1, load_facenet, preprocess
from advface.models.split import split_facenet

__all__ = ["InceptionResnetV1", "load_facenet", "preprocess", "split_facenet"]
