"""Images (PNG bytes) and texts -> MedImageInsight embeddings, through the online endpoint.

``contract`` maps rows to the request body and the response back to row-aligned vectors (pure);
``retry`` decides what is worth retrying and how long to wait (pure); ``auth`` keeps an Entra
token fresh; ``limiter`` caps requests in flight across the whole fleet (Redis); ``client`` does
the HTTP.
"""

from pipeline.embed.auth import AZURE_ML_SCOPE, TokenCache, entra_credential
from pipeline.embed.client import EndpointClient
from pipeline.embed.contract import EMBEDDING_DIM, EmbedResult, Row, build_request, parse_response
from pipeline.embed.limiter import RedisLimiter

__all__ = [
    "AZURE_ML_SCOPE",
    "EMBEDDING_DIM",
    "EmbedResult",
    "EndpointClient",
    "RedisLimiter",
    "Row",
    "TokenCache",
    "build_request",
    "entra_credential",
    "parse_response",
]
