"""Images for vision-language models: the RKNN image encoder, preprocessing, and a cache of encoded images."""
