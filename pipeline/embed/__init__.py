"""Images (PNG bytes) and texts -> MedImageInsight embeddings, through the online endpoint.

``contract`` maps rows to the request body and the response back to row-aligned vectors (pure);
``retry`` decides what is worth retrying and how long to wait (pure); ``client`` does the HTTP.
"""

from pipeline.embed.client import AZURE_ML_SCOPE, EndpointClient
from pipeline.embed.contract import EMBEDDING_DIM, EmbedResult, Row, build_request, parse_response

__all__ = [
    "AZURE_ML_SCOPE",
    "EMBEDDING_DIM",
    "EmbedResult",
    "EndpointClient",
    "Row",
    "build_request",
    "parse_response",
]
