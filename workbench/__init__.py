"""The mapping workbench: tools that run the pipeline's stages offline over a
site's own messages (``ehrbridge mappings test|explain|unmapped|check``).

They sit above pipelines/ and the site config; mappings/ below them holds
only the mapping format and its compiled tables, which the hot path uses.
"""
