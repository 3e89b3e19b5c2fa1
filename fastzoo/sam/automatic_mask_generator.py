class SamAutomaticMaskGenerator:  # placeholder, replaced below
    pass
