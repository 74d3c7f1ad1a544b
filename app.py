"""Entry point of the MIMO Chat app (also the Hugging Face Space ``app_file``).

    python app.py [--host 0.0.0.0] [--port 7860] [--share] [--model lite|tiny|DIR]
"""

import sys

from mimo_chat.app.launch import main

if __name__ == "__main__":
    sys.exit(main())
