from rgsd_pipeline.cli import main

if __name__ == "__main__":  # engines start worker processes with spawn, which re-import this module
    main()
