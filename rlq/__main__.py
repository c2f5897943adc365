from rlq.train import main

main()
