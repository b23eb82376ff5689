"""Edge/cloud collaborative decoding: a llama.cpp draft on the edge, an HF target verifying in the cloud, over HTTP."""
