"""Evidence rules of a grounded reply: names from the image, facts from the knowledge base.

``intent`` reads the question, ``evidence`` gathers what the image shows, ``policy`` decides what
may be said, ``compose`` plans the raw reply text, ``framing`` holds its fixed sentences.
"""
