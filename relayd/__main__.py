import sys

from relayd.daemon import main

sys.exit(main())
